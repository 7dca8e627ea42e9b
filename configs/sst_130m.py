"""130M SST (Sparse Spectral Training, Zhao et al., ICML 2025: W = U diag(s) Vᵀ, all of s and r sampled
singular vectors trained, new samples per iteration, re-SVD per round; colax.projections.sst.SST).

Recipe source: the paper (arXiv 2405.15481v3; the authors' repository could not be read here).
r = 64: the paper's LLaMA-130M rank; 20k steps x 512 x 256 = its 2.6B C4 tokens.
Iterations of 200 steps, each beginning with a 20-step lr re-warmup, rounds of 12 iterations (768 / 64): appendix F.2.
Not in the paper for LLaMA as far as we could read it, so the shared full-rank recipe: lr 1e-3, AdamW with
weight decay 0.01, clipping 0.5, the size's warmup (colax.config.preset).
"""

from colax import config


def get_config():
    return config.preset("sst", "130m")

"""1B SST (Sparse Spectral Training, Zhao et al., ICML 2025: W = U diag(s) Vᵀ, all of s and r sampled
singular vectors trained, new samples per iteration, re-SVD per round; colax.projections.sst.SST).

Recipe source: the paper (arXiv 2405.15481v3; the authors' repository could not be read here).
r = 128: the paper's LLaMA-1.3B rank (6% of d); 100k steps x 512 x 256 = its 13.1B C4 tokens.
Iterations of 200 steps, each beginning with a 20-step lr re-warmup, rounds of 16 iterations (2048 / 128): appendix F.2.
Not in the paper for LLaMA as far as we could read it, so the shared full-rank recipe: lr 1e-3, AdamW with
weight decay 0.01, clipping 0.5, the size's warmup (colax.config.preset).
"""

from colax import config


def get_config():
    return config.preset("sst", "1b")

"""60M SST (Sparse Spectral Training, Zhao et al., ICML 2025: W = U diag(s) Vᵀ, all of s and r sampled
singular vectors trained, new samples per iteration, re-SVD per round; colax.projections.sst.SST).

Recipe source: the paper (arXiv 2405.15481v3; the authors' repository could not be read here).
r = 64: the paper has no LLaMA-60M run; 64 is its rank at LLaMA-130M and every OPT size.
Iterations of 200 steps, each beginning with a 20-step lr re-warmup, rounds of 8 iterations (d / r = 512 / 64): appendix F.2.
Not in the paper for LLaMA as far as we could read it, so the shared full-rank recipe: lr 1e-3, AdamW with
weight decay 0.01, clipping 0.5, the size's warmup (colax.config.preset).
"""

from colax import config


def get_config():
    return config.preset("sst", "60m")

"""130M SST (Sparse Spectral Training: W = U diag(s) Vᵀ, all of s and r sampled singular vectors
trained per round, re-SVD between rounds); model size and recipe: colax.config.preset."""

from colax import config


def get_config():
    return config.preset("sst", "130m")

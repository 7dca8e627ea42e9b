"""colax: CoLA and CoLA-M (low-rank activation LLaMA pre-training) in JAX/Flax."""

__version__ = "0.1.0"

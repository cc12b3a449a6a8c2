"""diffgrad-bench: a benchmark of gradient estimators through diffusion samplers."""

__version__ = "0.1.0"

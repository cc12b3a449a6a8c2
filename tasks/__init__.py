"""Standardized tasks: a model, sampler settings, rewards, targets and evaluation metrics."""

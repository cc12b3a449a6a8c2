"""Gradient estimators, one module each. See estimators/base.py for the contract and
bench/registry.py for how names map to classes."""

"""Datasets, sampling, training order, loaders and the case split."""

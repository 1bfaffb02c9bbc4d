"""Backends: one module per backend; each registers its kernels on import."""

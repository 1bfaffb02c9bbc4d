"""Kernel sources and the custom-op glue that runs them."""

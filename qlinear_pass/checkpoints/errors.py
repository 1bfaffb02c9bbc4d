"""Checkpoint errors."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: missing, truncated or mismatched
    tensors, or a quantization this package does not support (the message names the
    tensor or layer and the feature)."""

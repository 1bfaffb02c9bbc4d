"""Quantized checkpoints: compressed-tensors (what llm-compressor writes and vLLM /
transformers read) <-> our reference modules.

::

    model = MyModel(config)                      # float, on the meta device or not
    qlinear_pass.load_quantized(model, "path/to/checkpoint")
    qlinear_pass.save_quantized(model, "out/")   # config.json + model.safetensors
"""
from .errors import CheckpointError
from .load import load_quantized
from .save import save_quantized

__all__ = ["load_quantized", "save_quantized", "CheckpointError"]

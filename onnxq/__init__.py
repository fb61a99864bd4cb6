"""onnxq: fully static, integer-only quantization of ONNX language models for Qualcomm's HTP.

The Python API mirrors the CLI::

    import onnxq
    onnxq.export(None, "smollm2/model.onnx")                     # embedded SmolLM2-135M
    result = onnxq.quantize("smollm2/model.onnx", "smollm2-w8a16", preset="w8a16")
    ppl = onnxq.perplexity("smollm2-w8a16/model.qdq.onnx", windows)
    report = onnxq.validate("smollm2-w8a16/model.qdq.onnx", windows, context_dir=Path("htp"))

Imports are lazy so that ``onnxq --help`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["OnnxqError", "export", "perplexity", "quantize", "validate"]

_LAZY = {
    "export": ("onnxq.export", "export"),
    "quantize": ("onnxq.pipeline", "quantize"),
    "perplexity": ("onnxq.evaluate", "perplexity"),
    "validate": ("onnxq.qnn", "validate"),
    "OnnxqError": ("onnxq.errors", "OnnxqError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")

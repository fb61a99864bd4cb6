"""onnxq: fully static, integer-only quantization of ONNX language models for Qualcomm's HTP.

The Python API mirrors the CLI::

    import calib.data
    import onnxq
    from onnxq.core.sources import tokenizer_for

    onnxq.export(None, "smollm2/model.onnx")                            # embedded SmolLM2-135M
    result = onnxq.quantize("smollm2/model.onnx", "smollm2-w8a16", preset="w8a16")
    options = onnxq.QuantizeOptions(preset="w4a8", budget=0.1)   # validated once; it is the recipe
    onnxq.quantize("smollm2/model.onnx", "smollm2-w4a8", options)
    again = onnxq.read_recipe("smollm2-w4a8/recipe.toml").options    # what that run resolved
    tok = tokenizer_for("smollm2/model.onnx")                          # the tokenizer exported beside it
    windows = calib.data.windows(tok, "wikitext2", 512, 8).ids         # token ids, (8, 512)
    ppl = onnxq.perplexity("smollm2-w8a16/model.qdq.onnx", windows)
    report = onnxq.validate("smollm2-w8a16/model.qdq.onnx", windows, context_dir="ctx")
    onnxq.package("smollm2-kv-w8a16", "smollm2-genai")             # a folder onnxruntime-genai loads

Imports are lazy so that ``onnxq --help`` does not load torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "LearnConfig",
    "OnnxqError",
    "QuantizeOptions",
    "export",
    "package",
    "perplexity",
    "quantize",
    "read_recipe",
    "validate",
]

_LAZY = {
    "export": ("onnxq.stages.export", "export"),
    "quantize": ("onnxq.stages.pipeline", "quantize"),
    "perplexity": ("onnxq.evaluation.evaluate", "perplexity"),
    "validate": ("onnxq.device.validation", "validate"),
    "package": ("onnxq.device.genai", "package"),
    "OnnxqError": ("onnxq.core.errors", "OnnxqError"),
    "QuantizeOptions": ("onnxq.core.options", "QuantizeOptions"),
    "LearnConfig": ("onnxq.core.options", "LearnConfig"),
    "read_recipe": ("onnxq.core.options", "read_recipe"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")

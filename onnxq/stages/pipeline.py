"""``onnxq quantize``: float ONNX in, QDQ ONNX with fixed scales out.

:func:`~onnxq.stages.run.run_stages` prepares, plans, calibrates, chooses widths, learns and rounds
the weights, each stage taking the options; the quantizers are then emitted (:mod:`~onnxq.stages.qdq`)
and the folder written. A KV-cache folder is
quantized as its scoring graph (:mod:`~onnxq.stages.pipeline_kv`). The input file is never touched.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from onnxq.core import ir as oir
from onnxq.core.errors import OnnxqError
from onnxq.core.files import check_new_output
from onnxq.core.options import QuantizeOptions
from onnxq.stages.pipeline_kv import is_kv_folder, quantize_kv
from onnxq.stages.prepare import Progress
from onnxq.stages.qdq import emit_qdq
from onnxq.stages.results import QuantizeResult
from onnxq.stages.run import run_stages, write_run


def quantize(
    model_path: str | Path,
    output: str | Path,
    options: QuantizeOptions | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    **changes: Any,
) -> QuantizeResult:
    """Quantize the float ONNX model at ``model_path`` (or a KV-cache folder) into the folder ``output``.

    ``options`` default to :class:`~onnxq.core.options.QuantizeOptions`; keyword arguments set or change
    fields of it (``quantize(m, out, preset="w4a8")``). Writes ``model.qdq.onnx``,
    ``precision_map.json`` (editable, accepted back with ``precision_map=``), ``encodings.json``
    (onnxq's, by quantization point), ``model.encodings`` (AIMET's, by tensor, for QAIRT),
    ``recipe.toml`` (the options as resolved: replays the run) and ``summary.json``, plus the
    tokenizer files. A KV-cache folder gets ``prefill.qdq.onnx`` and ``decode.qdq.onnx`` besides
    (:mod:`~onnxq.stages.pipeline_kv`).
    """
    start = time.perf_counter()
    o = replace(options or QuantizeOptions(), **changes)  # validated here, once
    model_path = Path(model_path)
    output = Path(output)
    if is_kv_folder(model_path):
        return quantize_kv(model_path, output, o, overwrite=overwrite, progress=progress)
    check_new_output(output, overwrite=overwrite, inputs=[model_path])
    float_model = oir.load(model_path)
    if "onnxq.kv_slots" in float_model.metadata_props:
        raise OnnxqError(
            f"{model_path} is one graph of a KV-cache pair",
            f"quantize the folder holding prefill.onnx and decode.onnx: onnxq quantize {model_path.parent}",
        )
    run = run_stages(model_path, float_model, o, progress=progress, scratch=output.parent / f".{output.name}.learn")
    model = emit_qdq(run.prepared.model, run.plan, run.encodings)
    graphs = {"model.qdq.onnx": model}
    return write_run(run, output, graphs, [model_path], source=model_path, started=start, overwrite=overwrite)

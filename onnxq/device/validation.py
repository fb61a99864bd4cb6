"""Validation: a QDQ model (or a KV-cache pair, run as a generator runs it) on the HTP against ONNX Runtime CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError
from onnxq.core.files import atomic_dir, check_new_output
from onnxq.device.generate import Stepper, graphs
from onnxq.device.qnn import DEFAULT_HTP_ARCH, assigned_nodes, cpu_session, graph_stem, session


@dataclass
class ValidationReport:
    """HTP against ONNX Runtime CPU on the same QDQ model and the same tokens."""

    model: str
    nodes_total: int
    nodes_on_qnn: int
    windows: int
    max_abs_error: float
    mean_abs_error: float
    output_scale: float | None
    error_in_steps: float | None
    top1_agreement: float
    seconds_htp: float
    context_model: str | None = None
    context_reloaded: bool | None = None
    context_max_abs_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def share_on_qnn(self) -> float:
        return self.nodes_on_qnn / max(self.nodes_total, 1)


def _output_scale(model_path: Path) -> float | None:
    """The scale of the DequantizeLinear that produces the first graph output."""
    import onnx_ir as ir

    model = ir.load(model_path)
    out = model.graph.outputs[0]
    producer = out.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = producer.inputs[1].const_value
    return None if scale is None else float(np.asarray(scale.numpy()).reshape(-1)[0])


def validate(
    model: str | Path,
    token_windows: np.ndarray,
    *,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
    soc_model: str | None = None,
    context_dir: str | Path | None = None,
    overwrite: bool = False,
) -> ValidationReport:
    """Run ``model`` on the HTP and on ORT CPU over ``token_windows`` and compare the logits; with
    ``context_dir`` (a new folder unless ``overwrite``), also write the HTP context model there and rerun it."""
    model = Path(model)
    if context_dir is None:
        return _validate(model, token_windows, htp_arch, soc_model, None)
    context_dir = Path(context_dir)
    check_new_output(context_dir, overwrite=overwrite, inputs=[model])
    name = f"{graph_stem(model)}_ctx.onnx"
    with atomic_dir(context_dir, overwrite=overwrite) as tmp:
        report = _validate(model, token_windows, htp_arch, soc_model, tmp / name)
    report.context_model = str(context_dir / name)
    return report


def _validate(
    model: Path, token_windows: np.ndarray, htp_arch: str | None, soc_model: str | None, context_file: Path | None
) -> ValidationReport:
    htp = session(model, htp_arch=htp_arch, soc_model=soc_model, context_file=context_file)
    assigned = assigned_nodes(htp)  # nodes of ORT's optimized graph, per EP
    cpu = cpu_session(model)
    feed = htp.get_inputs()[0].name
    runs = []
    t_htp = 0.0
    for window in token_windows:
        ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
        t = time.perf_counter()
        got = htp.run(None, {feed: ids})[0]
        t_htp += time.perf_counter() - t
        runs.append((got, cpu.run(None, {feed: ids})[0]))
    report = _compared(str(model), [assigned], runs, _output_scale(model), t_htp)
    if context_file is not None:
        if not context_file.exists():
            raise OnnxqError(f"the QNN EP did not write {context_file}", "check the provider options")
        reloaded = session(context_file, htp_arch=htp_arch, soc_model=soc_model)
        ids = np.asarray(token_windows[0], dtype=np.int64).reshape(1, -1)
        again = reloaded.run(None, {reloaded.get_inputs()[0].name: ids})[0]
        report.context_reloaded = True
        report.context_max_abs_error = float(np.abs(again - runs[0][0]).max())
    return report


def validate_pair(
    folder: str | Path,
    token_windows: np.ndarray,
    *,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
    soc_model: str | None = None,
    decode_tokens: int = 4,
) -> ValidationReport:
    """The prefill/decode pair of ``folder`` on the HTP against ORT CPU, run as a generator runs it: each
    window's tokens through prefill in chunks, its last ``decode_tokens`` through decode one by one."""
    folder = Path(folder)
    prefill, _ = graphs(folder)
    htp = Stepper(folder, "qnn", htp_arch=htp_arch, soc_model=soc_model)
    cpu = Stepper(folder, "cpu")
    assigned = [assigned_nodes(s) for s in (htp.prefill, htp.decode)]
    runs = []
    t_htp = 0.0
    for window in token_windows:
        ids = np.asarray(window, dtype=np.int64).reshape(-1)[: htp.shape.slots]
        cut = max(len(ids) - decode_tokens, 1)
        outs = []
        for stepper in (htp, cpu):
            stepper.reset()
            t = time.perf_counter()
            outs.append(np.concatenate([stepper.step(ids[:cut]), *(stepper.step([i]) for i in ids[cut:])]))
            if stepper is htp:
                t_htp += time.perf_counter() - t
        runs.append((outs[0], outs[1]))
    return _compared(str(folder), assigned, runs, _output_scale(prefill), t_htp)


def _compared(
    model: str,
    assigned: list[dict[str, int]],
    runs: list[tuple[np.ndarray, np.ndarray]],
    scale: float | None,
    seconds: float,
) -> ValidationReport:
    """The report of (HTP, CPU) logits per window, for graphs whose nodes the sessions assigned as ``assigned``."""
    diffs = [np.abs(got.astype(np.float64) - ref) for got, ref in runs]
    worst = max(float(d.max()) for d in diffs)
    return ValidationReport(
        model=model,
        nodes_total=sum(sum(a.values()) for a in assigned),
        nodes_on_qnn=sum(a.get("QNNExecutionProvider", 0) for a in assigned),
        windows=len(runs),
        max_abs_error=worst,
        mean_abs_error=float(np.mean([d.mean() for d in diffs])),
        output_scale=scale,
        error_in_steps=(worst / scale) if scale else None,
        top1_agreement=float(np.mean([(got.argmax(-1) == ref.argmax(-1)).mean() for got, ref in runs])),
        seconds_htp=seconds,
    )

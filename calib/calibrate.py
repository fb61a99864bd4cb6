"""Static calibration: run the float graph in the mirror over token windows, observe, pick ranges.

Observers see each point's *root* tensors (the outputs of computing ops) as the mirror produces
them, window after window; nothing else is kept, so memory is one window's activations plus a
fixed-size histogram per point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from calib.mirror import Mirror
from calib.observers import METHODS, Observer
from onnxq.core.encodings import const_encoding, weight_encoding
from onnxq.core.errors import OnnxqError
from onnxq.core.ir import const_array
from onnxq.core.qtypes import Encoding, from_range
from onnxq.plan import Point, QuantPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointStats:
    """Calibration outcome of one activation point."""

    lo: float
    hi: float
    observed_lo: float
    observed_hi: float
    clipped: float


#: roles a rotation makes near-Gaussian (the ``aware`` initialisation treats them so)
ROTATED_ROLES = frozenset({"attn_in", "mlp_in", "head_in", "attn_out"})


def method_for(point: Point, method: str, rotated: bool = True) -> str:
    """``auto``: min/max at 16 bits (the step is tiny anyway), MSE-optimal clipping below.

    ``aware`` (Quant.npu's initialisation): mean ± k·std for tensors a rotation made near-Gaussian,
    min/max for the unrotated, heavy-tailed rest.
    """
    if method == "aware":
        return "aware" if rotated and point.role.kind in ROTATED_ROLES and point.bits < 16 else "minmax"
    if method != "auto":
        return method
    return "minmax" if point.bits >= 16 else "mse"


def observe(
    model: ir.Model,
    plan: QuantPlan,
    windows: Iterable[np.ndarray],
    *,
    histogram: Callable[[Point], bool] | bool = True,
    progress: Callable[[int], None] | None = None,
    logits: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, Observer]:
    """Run the float model over ``windows``, one observer per activation point (fixed memory).

    ``histogram`` says which points keep a histogram (needed by ``mse`` and ``percentile``);
    ``logits`` is given each window's first output (so that no other pass of the float model is needed).
    """
    mirror = Mirror(model)
    observers: dict[str, Observer] = {}
    by_root: dict[str, list[Observer]] = {}
    for point in plan.act_points():
        obs = Observer(histogram=histogram(point) if callable(histogram) else histogram)
        observers[point.name] = obs
        for root in point.roots:
            by_root.setdefault(root, []).append(obs)

    def tap(name: str, value: torch.Tensor) -> None:
        for obs in by_root.get(name, ()):
            obs.update(value)

    seen = 0
    with torch.inference_mode():
        for window in windows:
            out = mirror.run(mirror.window(window), tap=tap)
            if logits is not None:
                logits(out[mirror.output_names[0]])
            del out
            seen += 1
            if progress is not None:
                progress(1)
    if seen == 0:
        raise OnnxqError("no calibration windows", "pass calibration text with --calib")
    return observers


def encode(
    model: ir.Model,
    plan: QuantPlan,
    observers: dict[str, Observer],
    *,
    method: str = "auto",
    weight_method: str = "mse",
    rotated: bool = True,
    previous: dict[str, Encoding] | None = None,
) -> tuple[dict[str, Encoding], dict[str, PointStats]]:
    """Encodings for every point of ``plan`` from observers (a plan that changed only widths reuses them).

    ``previous`` encodings are kept for weights and constants whose spec did not change.
    """
    if method not in (*METHODS, "auto"):
        raise OnnxqError(f"unknown calibration method {method!r}", f"use one of: auto, {', '.join(METHODS)}")
    graph = model.graph
    encodings: dict[str, Encoding] = {}
    stats: dict[str, PointStats] = {}
    for point in plan.points.values():
        old = (previous or {}).get(point.name)
        if point.kind in ("weight", "const") and old is not None and old.spec == point.spec:
            encodings[point.name] = old
            continue
        const_values = [a for a in (const_array(graph.initializers.get(c)) for c in point.consts) if a is not None]
        if point.kind == "weight":
            encodings[point.name] = weight_encoding(const_values[0], point.spec, weight_method)
            continue
        if point.kind == "const":
            encodings[point.name] = const_encoding(point.spec, *const_values)
            continue
        if point.fixed_range is not None:
            encodings[point.name] = from_range(point.spec, *point.fixed_range)
            continue
        obs = observers[point.name]
        if obs.nonfinite:
            raise OnnxqError(
                f"{obs.nonfinite} NaN/inf values reached {point.name!r} during calibration",
                "check the float model on the calibration text (onnxq eval) before quantizing",
            )
        if obs.count == 0 and not const_values:
            log.warning("point %s saw no values during calibration; using [0, 1]", point.name)
        rs = obs.stats(
            method_for(point, method, rotated),
            point.spec.qmax - point.spec.qmin,
            symmetric=point.spec.symmetric,
            signed=point.spec.qtype.signed,
        )
        lo, hi = rs.lo, rs.hi
        for arr in const_values:
            lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
        if obs.count == 0 and not const_values:
            lo, hi = 0.0, 1.0
        encodings[point.name] = from_range(point.spec, lo, hi)
        stats[point.name] = PointStats(lo, hi, obs.lo if obs.count else lo, obs.hi if obs.count else hi, rs.clipped)
    return encodings, stats


def calibrate(
    model: ir.Model,
    plan: QuantPlan,
    windows: Iterable[np.ndarray],
    *,
    method: str = "auto",
    weight_method: str = "mse",
    rotated: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Encoding], dict[str, PointStats]]:
    """Observe ``windows`` (token ids ``[S]`` each) and derive every point's encoding."""
    if method not in (*METHODS, "auto"):
        raise OnnxqError(f"unknown calibration method {method!r}", f"use one of: auto, {', '.join(METHODS)}")
    observers = observe(
        model,
        plan,
        windows,
        histogram=lambda p: method_for(p, method, rotated) in ("mse", "percentile"),
        progress=progress,
    )
    return encode(model, plan, observers, method=method, weight_method=weight_method, rotated=rotated)

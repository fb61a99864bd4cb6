"""Rounding the weights with GPTQ: its inputs gathered during calibration, then the rounding."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import onnx_ir as ir

from onnxq.core.qtypes import Encoding
from onnxq.plan import QuantPlan

log = logging.getLogger(__name__)

#: calibration tokens per input channel below which GPTQ's refinement sweeps are skipped
SWEEP_TOKENS_PER_INPUT = 2


def gptq_inputs(model: ir.Model, plan: QuantPlan) -> dict[str, Any]:
    """A Hessian observer for the input of every linear with a planned per-channel weight."""
    from calib.gptq import HessianObserver

    return {name: HessianObserver() for name, _, _ in _rounded_linears(model, plan)}


def _rounded_linears(model: ir.Model, plan: QuantPlan) -> list[tuple[str, ir.Value, Any]]:
    """(input name, weight, weight point) of every linear GPTQ rounds, in graph order."""
    from calib.gptq import supported

    linears = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.metadata_props.get("onnxq.online_rotation"):
            continue
        weight = node.inputs[1]
        point = plan.points.get(weight.name) if weight is not None else None
        if point is not None and point.kind == "weight" and supported(point.spec):
            linears.append((node.inputs[0].name, weight, point))
    return linears


def apply_gptq(
    model: ir.Model,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    hessians: dict[str, Any],
    *,
    sweeps: int | None = None,
) -> int | None:
    """Replace each planned weight by its GPTQ rounding (on its encoding's grid).

    Returns the refinement sweeps run on the 4-bit weights (the most any got; None: no 4-bit weight),
    which is what summary.json reports. ``hessians`` is consumed: each goes once its last linear is rounded.

    The coordinate-descent sweeps after GPTQ (``sweeps``, default :data:`calib.gptq.SWEEPS`) run on
    4-bit weights only: at 8 bits rounding is already fine, and lm_head's 49k columns make them slow.
    They minimise the error on the calibration inputs exactly, so with fewer than
    :data:`SWEEP_TOKENS_PER_INPUT` tokens per input channel they are skipped: on synthetic layers
    they then raise the error on new inputs (0.75 tokens per input: +2 %; 2: -2 %; 16: -6 %).
    """
    from calib.gptq import SWEEPS, gptq

    done = 0
    swept: int | None = None
    linears = _rounded_linears(model, plan)
    readers = Counter(name for name, _, _ in linears)
    for name, weight, point in linears:
        obs = hessians.get(name)
        readers[name] -= 1
        if not readers[name]:  # its last reader (q/k/v share one): the Hessian goes before lm_head's big one
            hessians.pop(name, None)
        if obs is None or obs.h is None:
            continue
        polish = 0
        if point.spec.bits <= 4:
            enough = obs.n >= SWEEP_TOKENS_PER_INPUT * obs.h.shape[0]  # else the sweeps would fit noise
            polish = (SWEEPS if sweeps is None else sweeps) if enough else 0
            swept = max(swept or 0, polish)
        values = gptq(weight.const_value.numpy(), encodings[point.name], obs.hessian(), sweeps=polish)
        weight.const_value = ir.tensor(values, name=weight.name)
        done += 1
    log.info("GPTQ rounded %d weights (refinement sweeps on 4-bit weights: %s)", done, swept)
    return swept

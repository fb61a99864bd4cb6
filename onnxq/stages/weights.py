"""Rounding the weights with GPTQ, one decoder layer at a time.

Each linear's Hessian ``Σ xᵀx`` is gathered on the float model's inputs. Held for every layer at once
they are larger than the model's weights (in float64, input x input per linear), so
:func:`round_by_layer` runs the calibration windows through one layer at a time from the saved
residual stream, rounds that layer's weights and drops its Hessians before the next.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq.core import memory
from onnxq.core.qtypes import Encoding
from onnxq.plan import QuantPlan
from onnxq.stages.prepare import Progress
from rewrites.structure import Structure

if TYPE_CHECKING:
    from calib.mirror import Mirror

log = logging.getLogger(__name__)

#: calibration tokens per input channel below which GPTQ's refinement sweeps are skipped
SWEEP_TOKENS_PER_INPUT = 2


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
    places: dict[str, np.ndarray] | None = None,
) -> int | None:
    """Replace each planned weight by its GPTQ rounding (on its encoding's grid); where ``places`` is
    given, record each 4-bit weight's place between codes in it (:func:`calib.gptq.gptq`'s, float16).

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
        hessian = obs.hessian(last=not readers[name])
        array = weight.const_value.numpy()
        place = np.empty(array.shape, np.float32) if places is not None and point.spec.bits <= 4 else None
        values = gptq(array, encodings[point.name], hessian, sweeps=polish, place=place)
        del hessian  # used up; gone before the next one is made
        if place is not None and places is not None:
            places[point.name] = place.astype(np.float16)
        weight.const_value = ir.tensor(values, name=weight.name)
        done += 1
    log.info("GPTQ rounded %d weights (refinement sweeps on 4-bit weights: %s)", done, swept)
    return swept


def round_by_layer(
    model: ir.Model,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    windows: np.ndarray,
    structure: Structure | None,
    *,
    sweeps: int | None = None,
    places: dict[str, np.ndarray] | None = None,
    progress: Progress | None = None,
) -> int | None:
    """Gather the Hessians and round the weights (:func:`apply_gptq`, ``places`` as it takes them)
    segment by segment.

    The segments are the steps before the first decoder layer, each layer, and the head after the
    last (one segment, the whole graph, without a ``structure``). Every window goes through a
    segment on the float weights before any of them is rounded, so each Hessian is the one a
    whole-graph pass gathers; the rounded layer's float weights then leave the mirror.
    Returns what :func:`apply_gptq` returns.
    """
    import torch

    from calib.gptq import HessianObserver
    from calib.mirror import Mirror

    mirror = Mirror(model)
    feed = mirror.input_names[0]
    segments = _segments(mirror, structure)
    produced_in = mirror.step_index()
    linears = _rounded_linears(model, plan)
    stream = [mirror.window(w)[feed] for w in windows]
    tick = progress("GPTQ (layers)", len(segments)) if progress else None
    swept: int | None = None
    with torch.inference_mode():
        for first, last, source, target in segments:
            mine = [lin for lin in linears if first <= produced_in.get(lin[0], -1) <= last]
            hessians = {name: HessianObserver() for name, _, _ in mine}

            def tap(name: str, value: torch.Tensor, hessians: dict[str, HessianObserver] = hessians) -> None:
                if name in hessians:
                    hessians[name].update(value)

            # the head runs only as far as its last rounded linear's input: a 128k-vocabulary lm_head's
            # logits are 256 MB a window, and nothing reads them
            stop = last
            if target is None:
                stop = max((produced_in.get(n, first - 1) for n in hessians), default=first - 1)
            for i, x in enumerate(stream):
                if first == 0 and target is None:  # the whole graph: each value freed after its last use
                    mirror.run({source: x}, tap=tap, stop_at=stop)
                    continue
                values = {source: x}
                mirror.run_range(first, stop + 1, values, tap)
                if target is not None:
                    stream[i] = values[target]
            if mine:
                polished = apply_gptq(model, plan, encodings, hessians, sweeps=sweeps, places=places)
                swept = polished if swept is None else max(swept, polished or 0)
                for _, weight, _ in mine:  # never run again: the float copy can go
                    mirror.consts.pop(weight.name, None)
                memory.trim()  # else the freed float and temporary weights stay resident, layer after layer
            if tick is not None:
                tick(1)
    return swept


def _segments(mirror: Mirror, structure: Structure | None) -> list[tuple[int, int, str, str | None]]:
    """(first step, last step, value read, value handed on) of the embedding, each layer and the head;
    the whole graph as one segment where the layers do not stand alone."""
    from calib.layers import head_range, standing_layers

    feed, last = mirror.input_names[0], len(mirror.steps) - 1
    whole = [(0, last, feed, None)]
    ranges = standing_layers(mirror, structure)
    if ranges is None:
        return whole
    embedding = (0, ranges[0][0] - 1, feed, ranges[0][2])
    head = head_range(mirror, ranges)
    if embedding[1] < 0 or not mirror.external_inputs(0, embedding[1]) <= {feed} or head is None:
        return whole
    return [embedding, *ranges, (head[0], last, head[1], None)]

"""Where each decoder layer sits among the mirror's steps, so one layer can run on its own inputs."""

from __future__ import annotations

import logging

from calib.mirror import Mirror
from onnxq.core.errors import OnnxqError
from rewrites.structure import Structure

log = logging.getLogger(__name__)


def layer_ranges(mirror: Mirror, structure: Structure) -> list[tuple[int, int, str, str]]:
    """(first step, last step, input value, output value) of every decoder layer.

    A layer is the run of steps from just after the previous layer's residual Add to its own MLP
    residual Add; it must read nothing from outside but the residual stream (and constants).
    """
    index = mirror.step_index()
    by_name = {step.name: step for step in mirror.steps}
    ranges = []
    previous_end = -1
    for layer in structure.layers:
        start_value = layer.attn_norm.input
        if layer.mlp_residual not in by_name:
            raise OnnxqError(f"layer {layer.index}'s residual Add is not in the graph", "report this as a bug")
        end_value = by_name[layer.mlp_residual].outputs[0]
        first, last = previous_end + 1, index[end_value]
        if layer.index == 0:
            first = min(i for i, s in enumerate(mirror.steps) if start_value in s.inputs)
        external = mirror.external_inputs(first, last)
        if external != {start_value}:
            raise OnnxqError(
                f"layer {layer.index} reads {sorted(external - {start_value})[:3]} from outside itself",
                "use a graph from onnxq export (constants folded)",
            )
        ranges.append((first, last, start_value, end_value))
        previous_end = last
    return ranges


def standing_layers(mirror: Mirror, structure: Structure | None) -> list[tuple[int, int, str, str]] | None:
    """:func:`layer_ranges`, or None where the graph has no decoder layers or they do not stand alone
    (the callers then run the whole graph at once)."""
    if structure is None or not structure.layers:
        return None
    try:
        return layer_ranges(mirror, structure)
    except OnnxqError as e:
        log.warning("the decoder layers do not stand alone (%s): whole-graph passes, more memory", e.problem)
        return None


def head_range(mirror: Mirror, ranges: list[tuple[int, int, str, str]]) -> tuple[int, str] | None:
    """(first step, value read) of the steps after the last decoder layer (the final norm and the
    lm_head), where they read nothing but the residual stream the last layer hands on."""
    first, stream = ranges[-1][1] + 1, ranges[-1][3]
    if first >= len(mirror.steps) or not mirror.external_inputs(first, len(mirror.steps) - 1) <= {stream}:
        return None
    return first, stream

"""Prepare a float graph for planning: canonical rewrites, structure, rotations, the outlier split.

The same function prepares the scoring graph and each graph of a KV-cache pair; with the same
seed, rotations and outlier channels, their float weights come out the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core import recipes
from onnxq.core.errors import OnnxqError
from onnxq.core.options import ROTATIONS

if TYPE_CHECKING:
    from calib.residual import Widths
from rewrites import canonical
from rewrites.base import RewriteResult, apply
from rewrites.gqa import group_query_attention
from rewrites.hadamard import random_orthogonal
from rewrites.outliers import choose_channels, split_outlier_channels
from rewrites.rotate import fold_norm_weights, hadamard_rotations, online_hadamard, rotate_heads, rotate_residual
from rewrites.structure import Structure, StructureError, discover, generic_roles, tensor_roles

log = logging.getLogger(__name__)

Progress = Callable[[str, int], Callable[..., None]]  # a tick: (count, optional note)

#: (rotated float model, its structure) -> layer -> down_proj input channels to split off
OutlierChooser = Callable[[ir.Model, Structure], dict[int, list[int]]]
#: returns an orthogonal hidden x hidden matrix to merge on top of R1, and a note for the summary
R1Refiner = Callable[[ir.Model, Structure], tuple[np.ndarray, str]]
R1_WINDOWS = 4
DEFAULT_OUTLIER_LIMIT = 8
OUTLIER_WINDOWS = 4


def _windows_of(model: ir.Model, tokens: np.ndarray, calib: str, count: int) -> np.ndarray:
    """``count`` windows of the calibration ``tokens`` at the model's own (static) sequence length."""
    from calib import data

    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    assert ids.shape is not None
    return data.cut(tokens, calib, int(ids.shape[1]), count).ids


def outlier_chooser(
    tokens: np.ndarray,
    calib: str,
    ratio: float,
    limit: int = DEFAULT_OUTLIER_LIMIT,
) -> OutlierChooser:
    """Pick each layer's outlier channels from peaks over a few calibration windows of the float model
    (``tokens``: the calibration text ``calib``, tokenized)."""
    from calib.peaks import channel_peaks

    def choose(model: ir.Model, structure: Structure) -> dict[int, list[int]]:
        windows = _windows_of(model, tokens, calib, OUTLIER_WINDOWS)
        inputs = {layer.index: layer.mlp.down.input for layer in structure.layers}
        peaks = channel_peaks(model, list(inputs.values()), windows)
        return {i: choose_channels(peaks[name], ratio, limit) for i, name in inputs.items()}

    return choose


def r1_refiner(tokens: np.ndarray, calib: str, widths: Widths, seed: int) -> R1Refiner:
    """Learn R1 on top of the Hadamard one (:mod:`calib.residual`) from a few calibration windows."""
    from calib.residual import learn_r1

    def refine(model: ir.Model, structure: Structure) -> tuple[np.ndarray, str]:
        windows = _windows_of(model, tokens, calib, R1_WINDOWS)
        result = learn_r1(model, structure, windows, widths, seed=seed)
        verdict = "kept" if result.kept else "not kept (no lower)"
        note = f"R1 learned on top: stream linears' error {result.before:.4g} -> {result.after:.4g}, {verdict}"
        return result.rotation, note

    return refine


def check_input(model: ir.Model, seq_len: int | None, where: str) -> tuple[ir.Model, int]:
    """The model at a supported opset and the length it is quantized at: what a model fails at once,
    before any data is read."""
    model = oir.require_opset(model, where)
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    if ids is None:
        raise OnnxqError(f"{where} has no 'input_ids' input", "pass a decoder LM exported with onnxq export or optimum")
    dims = list(ids.shape) if ids.shape is not None else []
    static_len = dims[1] if len(dims) == 2 and isinstance(dims[1], int) else None
    if seq_len is None:
        seq_len = static_len
    if seq_len is None:
        oir.require_static(model, where)  # raises the documented dynamic-shape error
        raise AssertionError("unreachable")
    return model, seq_len


@dataclass
class Prepared:
    """A float model brought to canonical form, with what the rewrites found."""

    model: ir.Model
    seq_len: int
    structure: Structure | None
    roles: dict[str, Any]
    rewrites: list[RewriteResult]
    notes: list[str]
    channels: dict[int, list[int]] = field(default_factory=dict)  # split off to the outlier side path


def prepare(
    model: ir.Model,
    *,
    seq_len: int | None = None,
    mask_value: float | None = None,
    rotate: str = "hadamard",
    online: Sequence[str] = (),
    seed: int = 0,
    where: str = "model",
    outliers: OutlierChooser | None = None,
    refine_r1: R1Refiner | None = None,
) -> Prepared:
    """Canonicalize a float model for quantization, find its structure, merge rotations.

    ``rotate``: ``hadamard`` (R1 + R2, randomized Hadamard), ``learned`` (the same, then R1 refined
    by ``refine_r1`` on the rotated float model), ``random`` (random orthogonal) or ``none``;
    ``online``: run-time rotations to insert (``r3``, ``r4``); ``outliers``: picks the down_proj
    input channels to split off (:mod:`rewrites.outliers`) from the rotated float model.
    """
    model, seq_len = check_input(model, seq_len, where)
    model_type = model.metadata_props.get("onnxq.model_type")
    recipe = recipes.for_model_type(model_type)
    if mask_value is None:
        stored = model.metadata_props.get("onnxq.mask_value")
        mask_value = float(stored) if stored else recipe.mask_value
    kv_step = "onnxq.kv_slots" in model.metadata_props  # its mask/position/cache inputs stay inputs
    steps = [
        *([] if kv_step else [lambda m: canonical.specialize_inputs(m, seq_len)]),
        canonical.fold_constants,
        lambda m: canonical.finite_mask(m, mask_value),
        canonical.untie_weights,
        canonical.fuse_rms_norm,
    ]
    model, results = apply(model, steps)
    oir.require_static(model, where)
    oir.ensure_names(model)
    notes = []
    if rotate not in ROTATIONS:
        raise OnnxqError(f"unknown rotation {rotate!r}", f"use --rotate {', '.join(ROTATIONS)}")
    if rotate == "learned" and refine_r1 is None:
        raise OnnxqError("--rotate learned needs calibration data to learn from", "quantize with onnxq quantize")
    try:
        structure: Structure | None = discover(model)
    except StructureError as exc:
        if rotate != "none" or online:
            raise
        roles = generic_roles(model)
        notes.append(f"{exc.problem}; using op-type roles")
        log.warning("%s; quantizing with op-type roles", exc.problem)
        return Prepared(model, seq_len, None, roles, results, notes)
    assert structure is not None
    gqa = group_query_attention(model, structure)
    results.append(gqa)
    if gqa.modified:
        structure = discover(model)
    notes.append(f"found {structure.describe()}")
    if rotate != "none":
        results.append(fold_norm_weights(model, structure))
        structure = discover(model)
        if rotate in ("hadamard", "learned"):
            r1, r2, built = hadamard_rotations(structure, seed)
        else:
            r1 = random_orthogonal(structure.hidden_size, seed)
            r2 = [
                random_orthogonal(structure.layers[0].attn.head_dim, seed + 1 + i) for i in range(len(structure.layers))
            ]
            built = ["R1, R2: random orthogonal"]
        notes += built
        results.append(rotate_residual(model, structure, r1))
        results.append(rotate_heads(model, structure, r2))
        if rotate == "learned":
            assert refine_r1 is not None  # checked above
            extra, note = refine_r1(model, structure)
            results.append(rotate_residual(model, structure, extra))
            notes.append(note)
    channels: dict[int, list[int]] = {}
    if outliers is not None:
        channels = outliers(model, structure)
        split = split_outlier_channels(model, structure, channels)
        results.append(split)
        if split.modified:
            notes.append("down_proj input channels on the 16-bit side path: " + "; ".join(split.notes))
            structure = discover(model)
    if online:
        results.append(online_hadamard(model, structure, list(online), seed))
        structure = discover(model)
    roles = tensor_roles(model, structure)
    return Prepared(model, seq_len, structure, roles, results, notes, channels)

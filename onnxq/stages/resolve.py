"""What an option left to ``auto`` (or unset) becomes for a preset and a model family."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from onnxq.core import presets as presets_mod
from onnxq.core import recipes
from onnxq.core.errors import OnnxqError
from onnxq.core.options import QuantizeOptions

if TYPE_CHECKING:
    from calib.residual import Widths

log = logging.getLogger(__name__)


def resolve_weight_method(o: QuantizeOptions, chosen: presets_mod.Preset) -> str:
    """``auto``: GPTQ for a narrow preset, else round-to-nearest after an MSE clipping search."""
    if o.weight_method != "auto":
        return o.weight_method
    return "gptq" if chosen.narrow else "mse"


def resolve_online(o: QuantizeOptions, chosen: presets_mod.Preset, recipe: recipes.Recipe) -> tuple[str, ...]:
    """The run-time rotations: as given, else the family's for a narrow preset."""
    if o.online_hadamard is not None:
        return o.online_hadamard
    return recipe.online_hadamard if chosen.narrow else ()


def check_encodings_version(version: str, *, blocked: bool) -> None:
    """Before calibrating: AIMET's 0.6.1 format has no way to write per-block (``blocked``) weights."""
    if version == "0.6.1" and blocked:
        raise OnnxqError(
            "AIMET's 0.6.1 encodings cannot hold per-block (LPBQ) weights",
            "use --encodings-version 1.0.0, or --weight-block 0 for per-channel 4-bit weights",
        )


def r1_widths(chosen: Any, recipe: recipes.Recipe) -> Widths:
    """The widths R1 is learned for: the preset's FC inputs and weights, 4-bit weights per the recipe's block."""
    from calib.residual import Widths

    block = recipe.weight_block if chosen.weight_bits == 4 else 0
    return Widths(chosen.act_bits, chosen.weight_bits, block)


def with_block(recipe: recipes.Recipe, block: int | None) -> recipes.Recipe:
    """The recipe with the user's ``--weight-block`` (None keeps the recipe's default)."""
    return recipe if block is None else replace(recipe, weight_block=block)

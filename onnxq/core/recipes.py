"""Per-family recipes (``models/*.toml``): export settings, default precision, expected numbers."""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from onnxq.core.errors import OnnxqError


@dataclass(frozen=True)
class Recipe:
    family: str
    model_types: tuple[str, ...]
    seq_len: int = 512
    mask_value: float = -100.0
    kept16: frozenset[str] = frozenset()
    lm_head_weight_bits: int = 8
    kv_cache_bits: int = 8
    weight_block: int = 0  # 4-bit weights per block of this many input rows (LPBQ); 0: per channel
    split_outliers: float = 0.0  # 8-bit presets: ratio for the 16-bit outlier side path; 0: off
    online_hadamard: tuple[str, ...] = ()  # run-time rotations for every preset but w8a16
    expected: dict[str, dict[str, float]] = field(default_factory=dict)


#: Used when no recipe matches: keep everything that is not a MatMul input at 16 bits.
GENERIC = Recipe(
    "generic",
    (),
    kept16=frozenset(
        {"embed", "residual", "norm", "scores", "softmax_in", "probs", "act", "head_in", "logits", "other"}
    ),
)


def recipe_dirs() -> list[Path]:
    """Checkout (editable install) first, then the installed data files."""
    return [Path(__file__).resolve().parents[2] / "models", Path(sys.prefix) / "share" / "onnxq" / "models"]


def _parse(path: Path) -> Recipe:
    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    export = data.get("export", {})
    precision = data.get("precision", {})
    return Recipe(
        family=data["family"],
        model_types=tuple(data.get("model_types", [])),
        seq_len=int(export.get("seq_len", 512)),
        mask_value=float(export.get("mask_value", -100.0)),
        kept16=frozenset(precision.get("kept16", GENERIC.kept16)),
        lm_head_weight_bits=int(precision.get("lm_head_weight_bits", 8)),
        kv_cache_bits=int(precision.get("kv_cache_bits", 8)),
        weight_block=int(precision.get("weight_block", 0)),
        split_outliers=float(precision.get("split_outliers", 0.0)),
        online_hadamard=tuple(precision.get("online_hadamard", ())),
        expected={k: dict(v) for k, v in data.get("expected", {}).items()},
    )


@cache
def all_recipes() -> tuple[Recipe, ...]:
    for folder in recipe_dirs():
        files = sorted(folder.glob("*.toml"))
        if files:
            return tuple(_parse(f) for f in files)
    return ()


def for_model_type(model_type: str | None) -> Recipe:
    """The recipe for a transformers ``model_type``; Llama's for unknown decoders we could parse."""
    for recipe in all_recipes():
        if model_type and model_type in recipe.model_types:
            return recipe
    for recipe in all_recipes():
        if recipe.family == "llama":
            return recipe
    return GENERIC


def get(family: str) -> Recipe:
    for recipe in all_recipes():
        if recipe.family == family:
            return recipe
    raise OnnxqError(f"no recipe named {family!r}", f"known: {', '.join(r.family for r in all_recipes())}")

"""What a quantization run returns and records: the result, the summary and the recipe as resolved."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxq.core.options import QuantizeOptions, recipe_toml, sha256_file
from onnxq.core.qtypes import Encoding
from onnxq.plan import QuantPlan

if TYPE_CHECKING:
    pass

from onnxq.stages.prepare import Prepared

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote and measured."""

    output: Path
    files: list[Path]
    summary: dict[str, Any]
    plan: QuantPlan
    encodings: dict[str, Encoding] = field(repr=False, default_factory=dict)


def recipe_text(resolved: QuantizeOptions, models: Sequence[Path], calib_ids: np.ndarray, sweeps: int | None) -> str:
    """``recipe.toml`` for a run: its options as resolved, and hashes of what it read."""
    from calib.gptq import SWEEPS

    if resolved.weight_method == "gptq" and resolved.gptq_sweeps is None and sweeps is not None:
        resolved = replace(resolved, gptq_sweeps=SWEEPS)
    inputs = {f"{Path(m).name} sha256": sha256_file(Path(m)) for m in models}
    inputs["calibration tokens sha256"] = hashlib.sha256(
        np.ascontiguousarray(calib_ids, np.int64).tobytes()
    ).hexdigest()
    if resolved.precision_map:
        inputs["precision map sha256"] = sha256_file(Path(resolved.precision_map))
    return recipe_toml(resolved, inputs)


def build_summary(
    model_path: Path,
    preset: str,
    plan: QuantPlan,
    prepared: Prepared,
    calib: str,
    windows: int,
    method: str,
    weight_method: str,
    stats: dict[str, Any],
    seconds: float,
    calib_seconds: float,
    rotation: dict[str, Any],
) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    for p in plan.points.values():
        key = f"{p.kind}:{p.spec.qtype.value}"
        dtypes[key] = dtypes.get(key, 0) + 1
    clipped = sorted(((s.clipped, name) for name, s in stats.items()), reverse=True)[:10]
    return {
        "onnxq": "summary/1",
        "input": str(model_path),
        "preset": preset,
        "seq_len": prepared.seq_len,
        "rotation": rotation,
        "structure": prepared.structure.describe() if prepared.structure else None,
        "rewrites": [r.summary() for r in prepared.rewrites],
        "notes": prepared.notes,
        "calibration": {
            "data": calib,
            "windows": windows,
            "method": method,
            "weights": weight_method,
            "seconds": round(calib_seconds, 2),
        },
        "counts": plan.counts(),
        "dtypes": dtypes,
        "most_clipped": [{"point": n, "fraction": round(c, 6)} for c, n in clipped if c > 0],
        "quantize_seconds_before_save": round(seconds, 2),
    }

"""What a quantization run returns and records: the result and the recipe as resolved."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.options import QuantizeOptions, recipe_toml, sha256_file
from onnxq.core.qtypes import Encoding
from onnxq.plan import QuantPlan


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

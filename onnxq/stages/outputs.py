"""The output folder of ``onnxq quantize``, written in one place for the scoring and the KV-cache graphs.

Everything lands in a temporary folder that replaces ``output`` at the end (:func:`atomic_dir`):
the QDQ graph(s), AIMET encodings for Qualcomm's converter, the editable precision map, onnxq's own
encodings, the tokenizer and config beside them, and ``summary.json`` with the files, time and
peak memory of the whole run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core.files import SIDE_FILES, atomic_dir
from onnxq.core.qtypes import Encoding
from onnxq.plan import QuantPlan
from onnxq.stages import aimet
from onnxq.stages.macs import mac_widths
from onnxq.stages.metrics import peak_rss_mb
from onnxq.stages.split import split

log = logging.getLogger(__name__)


def encodings_json(plan: QuantPlan, encodings: Mapping[str, Encoding]) -> dict[str, Any]:
    """onnxq's encodings file: every point's numbers and the tensors that carry them (weights: spec only)."""
    points: dict[str, Any] = {}
    for name, point in plan.points.items():
        enc = encodings[name]
        entry = enc.spec.to_json() if point.kind == "weight" else enc.to_json()
        entry.update({"kind": point.kind, "tensors": list(point.tensors) + list(point.consts)})
        if point.source:
            entry["source"] = point.source
        points[name] = entry
    return {"version": "onnxq/1", "preset": plan.preset.name, "points": points}


def write_quantized(
    output: Path,
    graphs: Mapping[str, ir.Model],
    *,
    plan: QuantPlan,
    encodings: Mapping[str, Encoding],
    encodings_version: str,
    source: Path,
    summary: dict[str, Any],
    recipe: str,
    started: float,
    overwrite: bool,
) -> list[Path]:
    """Write ``graphs`` (file name -> QDQ model), their side files and ``recipe`` (the text of
    ``recipe.toml``) into ``output``; returns the files.

    Each graph gets its AIMET encodings (``<stem>.encodings``, by its own tensor names); onnxq's
    ``encodings.json`` and ``precision_map.json`` name the points of ``plan`` (the first graph's).
    ``summary`` gains ``macs`` (the share of MatMul multiply-adds per
    pair of operand widths, :func:`~onnxq.stages.macs.mac_widths`), ``files``, ``seconds`` and ``peak_rss_mb``.
    """
    first_name = next(iter(graphs))
    with atomic_dir(output, overwrite=overwrite) as tmp:
        for name, model in graphs.items():
            oir.save(model, tmp / name)
            parts = split(model, weights=False)
            stem = name.removesuffix(".onnx").removesuffix(".qdq")
            aimet.write_tensors(parts.activations, parts.params, tmp / f"{stem}.encodings", encodings_version)
            del parts
        try:  # where the MatMul work runs, by operand widths (the first graph's)
            summary["macs"] = mac_widths(onnx.load(tmp / first_name))
        except ValueError as exc:
            log.warning("MAC shares not computed: %s", exc)
        (tmp / "precision_map.json").write_text(json.dumps(plan.precision_map(), indent=1) + "\n", encoding="utf-8")
        enc = encodings_json(plan, encodings)
        (tmp / "encodings.json").write_text(json.dumps(enc, indent=1) + "\n", encoding="utf-8")
        (tmp / "recipe.toml").write_text(recipe, encoding="utf-8")
        for side in SIDE_FILES:
            if (source / side).exists():
                shutil.copyfile(source / side, tmp / side)
        summary["files"] = sorted([p.name for p in tmp.iterdir()] + ["summary.json"])
        summary["seconds"] = round(time.perf_counter() - started, 2)
        summary["peak_rss_mb"] = peak_rss_mb()
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return [output / f for f in summary["files"]]

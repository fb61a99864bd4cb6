"""Quantize the generation graphs (prefill + decode, from ``onnxq export --kv-cache``) as one model.

Both graphs are prepared with the same rewrites and seed, so their tensors carry the same names
and their plans the same points (checked). One calibration runs the prefill graph through its KV
cache chunk after chunk (:class:`calib.feeds.CacheFeeds`); the encodings, and the GPTQ-rounded
weights, are then written into both graphs. A layer's cache input and output are one point (the
Concat that appends to the cache shares its quantizer), so what decode writes is what it reads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from onnxq import aimet, recipes
from onnxq import ir as oir
from onnxq import presets as presets_mod
from onnxq.errors import OnnxqError
from onnxq.files import SIDE_FILES, atomic_dir, check_new_output
from onnxq.metrics import peak_rss_mb
from onnxq.plan import build_plan, read_precision_map
from onnxq.qdq import emit_qdq
from onnxq.split import split

GRAPHS = ("prefill", "decode")


def is_kv_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f"{g}.onnx").exists() for g in GRAPHS)


def quantize_kv(
    folder: Path,
    output: Path,
    *,
    preset: str,
    calib: str,
    windows: int,
    method: str,
    weight_method: str,
    precision_map: str | Path | None,
    mask_value: float | None,
    rotate: str,
    seed: int,
    tokenizer: str | None,
    encodings_version: str,
    overwrite: bool,
    progress: Any,
) -> Any:
    """Quantize ``folder``'s prefill.onnx and decode.onnx into ``output`` (see the module docstring)."""
    from calib import data
    from calib.calibrate import encode, method_for, observe
    from calib.feeds import CacheFeeds
    from onnxq.export_kv import read_shape
    from onnxq.pipeline import QuantizeResult, apply_gptq, encodings_json, gptq_inputs, prepare
    from onnxq.sources import tokenizer_for

    start = time.perf_counter()
    chosen = presets_mod.get(preset)
    check_new_output(output, overwrite=overwrite, inputs=[folder])
    overrides = read_precision_map(precision_map) if precision_map else None
    chunk, shape, stored_mask = read_shape(folder / "prefill.onnx")
    prepared = {
        g: prepare(
            oir.load(folder / f"{g}.onnx"),
            mask_value=mask_value,
            rotate=rotate,
            seed=seed,
            where=str(folder / f"{g}.onnx"),
        )
        for g in GRAPHS
    }
    recipe = recipes.for_model_type(prepared["prefill"].model.metadata_props.get("onnxq.model_type"))
    plans = {
        g: build_plan(p.model, chosen, recipe, p.roles, p.structure, dict(overrides) if overrides else None)
        for g, p in prepared.items()
    }
    if set(plans["prefill"].points) != set(plans["decode"].points):
        odd = sorted(set(plans["prefill"].points) ^ set(plans["decode"].points))[:3]
        raise OnnxqError(
            f"prefill and decode graphs do not quantize alike (e.g. {', '.join(odd)})",
            "export both in one run with `onnxq export --kv-cache`",
        )
    prefill, plan = prepared["prefill"].model, plans["prefill"]
    tok = tokenizer_for(folder / "prefill.onnx", tokenizer)
    length = min(shape.slots, 512)
    calib_windows = data.windows(tok, calib, length, windows)
    feeds = CacheFeeds(calib_windows.ids, chunk, shape, stored_mask if mask_value is None else mask_value)
    tick = progress("calibrating (steps)", len(feeds)) if progress else None
    t_cal = time.perf_counter()
    rotated = rotate != "none"
    if weight_method == "auto":
        weight_method = "gptq" if chosen.weight_bits == 4 else "mse"
    hessians = gptq_inputs(prefill, plan) if weight_method == "gptq" else None
    observers = observe(
        prefill,
        plan,
        feeds,
        histogram=lambda p: method_for(p, method, rotated) in ("mse", "percentile") or p.bits < 16,
        hessians=hessians,
        progress=tick,
    )
    scale_method = "mse" if weight_method == "gptq" else weight_method
    encodings, stats = encode(prefill, plan, observers, method=method, weight_method=scale_method, rotated=rotated)
    t_cal = time.perf_counter() - t_cal
    if hessians is not None:
        apply_gptq(prefill, plan, encodings, hessians)
        decode_inits = prepared["decode"].model.graph.initializers
        for point in plan.weight_points():
            for name in point.consts:  # the same rounding in both graphs
                decode_inits[name].const_value = prefill.graph.initializers[name].const_value
    models = {g: emit_qdq(prepared[g].model, plans[g], encodings) for g in GRAPHS}
    summary: dict[str, Any] = {
        "onnxq": "summary/1",
        "input": str(folder),
        "preset": chosen.name,
        "seq_len": chunk,
        "kv_cache": {"chunk": chunk, "context": shape.slots, "layers": shape.layers},
        "rotation": {"offline": rotate, "online": [], "seed": seed},
        "structure": prepared["prefill"].structure.describe() if prepared["prefill"].structure else None,
        "rewrites": [r.summary() for r in prepared["prefill"].rewrites],
        "notes": prepared["prefill"].notes,
        "calibration": {
            "data": calib,
            "windows": len(calib_windows),
            "window_tokens": length,
            "steps": len(feeds),
            "method": method,
            "weights": weight_method,
            "seconds": round(t_cal, 2),
        },
        "counts": plan.counts(),
        "dtypes": {},
        "most_clipped": [
            {"point": n, "fraction": round(s.clipped, 6)}
            for n, s in sorted(stats.items(), key=lambda kv: -kv[1].clipped)[:10]
            if s.clipped > 0
        ],
        "learning": None,
        "mixed_precision": None,
    }
    with atomic_dir(output, overwrite=overwrite) as tmp:
        for g, model in models.items():
            model.metadata_props.update({"onnxq.seed": str(seed), "onnxq.calib": str(calib)})
            oir.save(model, tmp / f"{g}.qdq.onnx")
        (tmp / "precision_map.json").write_text(json.dumps(plan.precision_map(), indent=1) + "\n", encoding="utf-8")
        (tmp / "encodings.json").write_text(
            json.dumps(encodings_json(plan, encodings), indent=1) + "\n", encoding="utf-8"
        )
        parts = split(models["prefill"], weights=False)
        aimet.write_tensors(parts.activations, parts.params, tmp / "prefill.encodings", encodings_version)
        for name in SIDE_FILES:
            if (folder / name).exists():
                shutil.copyfile(folder / name, tmp / name)
        summary["files"] = sorted([p.name for p in tmp.iterdir()] + ["summary.json"])
        summary["seconds"] = round(time.perf_counter() - start, 2)
        summary["peak_rss_mb"] = peak_rss_mb()
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return QuantizeResult(output, [output / f for f in summary["files"]], summary, plan, encodings)

"""Quantize the generation graphs (prefill + decode, from ``onnxq export --kv-cache``) as one model.

Both graphs are prepared with the same rewrites and seed, so their tensors carry the same names
and their plans the same points (checked). One calibration runs the prefill graph through its KV
cache chunk after chunk (:class:`calib.feeds.CacheFeeds`); the encodings, and the GPTQ-rounded
weights, are then written into both graphs. A layer's cache input and output are one point (the
Concat that appends to the cache shares its quantizer), so what decode writes is what it reads.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from onnxq.core import ir as oir
from onnxq.core import presets as presets_mod
from onnxq.core import recipes
from onnxq.core.errors import OnnxqError
from onnxq.core.files import check_new_output
from onnxq.core.options import DEFAULT_WINDOWS, GPTQ_WINDOWS, QuantizeOptions
from onnxq.plan import build_plan, read_precision_map
from onnxq.stages.outputs import write_quantized
from onnxq.stages.qdq import emit_qdq

GRAPHS = ("prefill", "decode")


def is_kv_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f"{g}.onnx").exists() for g in GRAPHS)


def quantize_kv(folder: Path, output: Path, o: QuantizeOptions, *, overwrite: bool, progress: Any) -> Any:
    """Quantize ``folder``'s prefill.onnx and decode.onnx into ``output`` (see the module docstring)."""
    from calib import data
    from calib.calibrate import encode, method_for, observe
    from calib.feeds import CacheFeeds
    from onnxq.core.sources import tokenizer_for
    from onnxq.core.steps import WINDOW, read_shape
    from onnxq.stages.prepare import outlier_chooser, prepare
    from onnxq.stages.resolve import check_encodings_version, resolve_online, resolve_weight_method, with_block
    from onnxq.stages.results import QuantizeResult, build_summary, recipe_text
    from onnxq.stages.weights import apply_gptq, gptq_inputs

    start = time.perf_counter()
    chosen = presets_mod.get(o.preset)
    check_new_output(output, overwrite=overwrite, inputs=[folder])
    overrides = read_precision_map(o.precision_map) if o.precision_map else None
    chunk, shape, stored_mask = read_shape(folder / "prefill.onnx")
    mask_value = stored_mask if o.mask_value is None else o.mask_value
    floats = {g: oir.load(folder / f"{g}.onnx") for g in GRAPHS}
    model_type = floats["prefill"].metadata_props.get("onnxq.model_type")
    recipe = with_block(recipes.for_model_type(model_type), o.weight_block)
    if chosen.weight_bits == 4 and recipe.weight_block:  # before any data is read (outliers, calibration)
        check_encodings_version(o.encodings_version, blocked=True)
    split_outliers = recipe.split_outliers if o.split_outliers is None else o.split_outliers
    splitting = split_outliers > 0 and chosen.act_bits < 16
    online = resolve_online(o, chosen, recipe)
    length = min(shape.slots, WINDOW)
    channels: dict[int, list[int]] = {}
    choose = outlier_chooser(
        lambda: tokenizer_for(folder / "prefill.onnx", o.tokenizer),
        o.calib,
        split_outliers,
        feeds=lambda ids: CacheFeeds(ids, chunk, shape, mask_value),
        length=length,
    )

    def same_channels(model: Any, structure: Any) -> dict[int, list[int]]:
        """Prefill picks the channels through its cache; decode splits the same ones."""
        if not channels:
            channels.update(choose(model, structure))
        return channels

    prepared = {
        g: prepare(
            floats.pop(g),
            mask_value=o.mask_value,
            rotate=o.rotate,
            online=online,
            seed=o.seed,
            where=str(folder / f"{g}.onnx"),
            outliers=same_channels if splitting else None,
        )
        for g in GRAPHS
    }
    plans = {
        g: build_plan(p.model, chosen, recipe, p.roles, p.structure, dict(overrides) if overrides else None)
        for g, p in prepared.items()
    }
    check_encodings_version(o.encodings_version, blocked=plans["prefill"].has_blocked_weights())
    if set(plans["prefill"].points) != set(plans["decode"].points):
        odd = sorted(set(plans["prefill"].points) ^ set(plans["decode"].points))[:3]
        raise OnnxqError(
            f"prefill and decode graphs do not quantize alike (e.g. {', '.join(odd)})",
            "export both in one run with `onnxq export --kv-cache`",
        )
    prefill, plan = prepared["prefill"].model, plans["prefill"]
    tok = tokenizer_for(folder / "prefill.onnx", o.tokenizer)
    weight_method = resolve_weight_method(o, chosen)
    count = o.windows or (GPTQ_WINDOWS if weight_method == "gptq" else DEFAULT_WINDOWS)  # as the scoring graph's
    calib_windows = data.windows(tok, o.calib, length, count)
    feeds = CacheFeeds(calib_windows.ids, chunk, shape, mask_value)
    tick = progress("calibrating (steps)", len(feeds)) if progress else None
    t_cal = time.perf_counter()
    rotated = o.rotate != "none"
    hessians = gptq_inputs(prefill, plan) if weight_method == "gptq" else None
    observers = observe(
        prefill,
        plan,
        feeds,
        histogram=lambda p: method_for(p, o.method, rotated) in ("mse", "percentile") or p.bits < 16,
        hessians=hessians,
        progress=tick,
    )
    scale_method = "mse" if weight_method == "gptq" else weight_method
    encodings, stats = encode(prefill, plan, observers, method=o.method, weight_method=scale_method, rotated=rotated)
    t_cal = time.perf_counter() - t_cal
    swept: int | None = None
    if hessians is not None:
        swept = apply_gptq(prefill, plan, encodings, hessians, sweeps=o.gptq_sweeps)
        decode_inits = prepared["decode"].model.graph.initializers
        for point in plan.weight_points():
            for name in point.consts:  # the same rounding in both graphs
                decode_inits[name].const_value = prefill.graph.initializers[name].const_value
    models = {g: emit_qdq(prepared[g].model, plans[g], encodings) for g in GRAPHS}
    for model in models.values():
        model.metadata_props.update(
            {
                "onnxq.seed": str(o.seed),
                "onnxq.calib": str(o.calib),
                "onnxq.rotate": o.rotate,
                "onnxq.online": ",".join(online),
                "onnxq.split_outliers": str(split_outliers) if splitting else "",
            }
        )
    summary = build_summary(
        folder,
        chosen.name,
        plan,
        prepared["prefill"],
        o.calib,
        len(calib_windows),
        o.method,
        weight_method,
        stats,
        time.perf_counter() - start,
        t_cal,
        {"offline": o.rotate, "online": list(online), "seed": o.seed},
    )
    summary["seq_len"] = chunk
    summary["kv_cache"] = {"chunk": chunk, "context": shape.slots, "layers": shape.layers}
    summary["calibration"].update(window_tokens=length, steps=len(feeds))
    summary["weight_block"] = recipe.weight_block
    summary["gptq_sweeps"] = swept
    summary["learning"] = None
    summary["mixed_precision"] = None
    files = write_quantized(
        output,
        {f"{g}.qdq.onnx": m for g, m in models.items()},
        plan=plan,
        encodings=encodings,
        encodings_version=o.encodings_version,
        source=folder,
        summary=summary,
        recipe=recipe_text(
            replace(
                o,
                windows=len(calib_windows),
                weight_method=weight_method,
                weight_block=recipe.weight_block,
                online_hadamard=online,
                split_outliers=split_outliers if splitting else 0.0,
            ),
            [folder / f"{g}.onnx" for g in GRAPHS],
            calib_windows.ids,
            sweeps=swept,
        ),
        started=start,
        overwrite=overwrite,
    )
    return QuantizeResult(output, files, summary, plan, encodings)

"""The stages of one quantization, run on one float graph: what the scoring and KV pipelines share.

:func:`run_stages` takes the options and goes through prepare (:mod:`~onnxq.stages.prepare`:
canonical rewrites, structure, rotations, the outlier split), plan (:mod:`onnxq.plan`), calibrate
(:mod:`calib.calibrate`), choose precisions (:mod:`~onnxq.stages.mixed`), learn (:mod:`calib.learn`)
and round the weights (:mod:`~onnxq.stages.weights`). The caller emits the quantizers
(:mod:`~onnxq.stages.qdq`) into its graphs and :func:`write_run` writes them
(:mod:`~onnxq.stages.outputs`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.core import memory, recipes
from onnxq.core import presets as presets_mod
from onnxq.core.errors import OnnxqError
from onnxq.core.options import DEFAULT_WINDOWS, GPTQ_WINDOWS, LEARN_SAMPLES, LearnConfig, QuantizeOptions
from onnxq.core.qtypes import Encoding
from onnxq.plan import CACHE_WHY, QuantPlan, build_plan, read_precision_map
from onnxq.stages.mixed import choose_precision
from onnxq.stages.outputs import write_quantized
from onnxq.stages.prepare import Prepared, Progress, check_input, outlier_chooser, prepare, r1_refiner
from onnxq.stages.resolve import check_encodings_version, r1_widths, resolve_online, resolve_weight_method, with_block
from onnxq.stages.results import QuantizeResult, recipe_text
from onnxq.stages.weights import round_by_layer

#: (the prepared float graph, the options as resolved, the recipe) -> point -> width to hold it at
Pins = Callable[[Prepared, QuantizeOptions, recipes.Recipe], Mapping[str, int]]


@dataclass
class Run:
    """What the stages made of one float graph, before its quantizers are emitted."""

    resolved: QuantizeOptions  # every default resolved: the recipe
    recipe: recipes.Recipe
    prepared: Prepared
    plan: QuantPlan
    encodings: dict[str, Encoding]
    stats: dict[str, Any]
    calib_ids: np.ndarray
    calib_seconds: float
    summary: dict[str, Any]  # what the stages report beyond the common summary
    metadata: dict[str, str]  # the options each quantized graph records in its metadata
    scratch: Path  # learning's checkpoint, kept until the output is written


def run_stages(
    model_path: Path,
    float_model: ir.Model,
    o: QuantizeOptions,
    *,
    progress: Progress | None,
    scratch: Path,
    pins: Pins | None = None,
) -> Run:
    """Prepare, plan, calibrate, choose precisions, learn and round the weights of one float graph.

    ``pins``: widths the caller holds points at (the KV cache's), chosen once the graph is prepared.
    ``scratch``: where learning keeps its checkpoint (removed once the output is written).
    """
    from calib import data
    from calib.calibrate import encode, method_for, observe
    from onnxq.core.sources import tokenizer_for

    memory.fixed_mmap_threshold()  # per-window tensors go back when freed instead of piling up in the heap
    chosen = presets_mod.get(o.preset)
    overrides = read_precision_map(o.precision_map) if o.precision_map else {}
    recipe = with_block(recipes.for_model_type(float_model.metadata_props.get("onnxq.model_type")), o.weight_block)
    if chosen.weight_bits == 4 and recipe.weight_block:  # before any data is read (outliers, calibration)
        check_encodings_version(o.encodings_version, blocked=True)
    # the family's default (Llama: 16); 16-bit inputs have the range already
    split_outliers = recipe.split_outliers if o.split_outliers is None else o.split_outliers
    splitting = split_outliers > 0 and chosen.act_bits < 16
    online = resolve_online(o, chosen, recipe)
    weight_method = resolve_weight_method(o, chosen)
    use_gptq = weight_method == "gptq"
    windows = o.windows or (GPTQ_WINDOWS if use_gptq else DEFAULT_WINDOWS)  # GPTQ's Hessians want more data
    learn = resolve_learning(o.learn, windows)
    float_model, _ = check_input(float_model, o.seq_len, str(model_path))  # the model's mistakes first, then the data's
    # the tokenizer and the text are read before the long work
    calib_tokens = data.tokenize(tokenizer_for(model_path, o.tokenizer), data.read_text(o.calib))
    prepared = prepare(
        float_model,
        seq_len=o.seq_len,
        mask_value=o.mask_value,
        rotate=o.rotate,
        online=online,
        seed=o.seed,
        where=str(model_path),
        outliers=outlier_chooser(calib_tokens, o.calib, split_outliers) if splitting else None,
        refine_r1=r1_refiner(calib_tokens, o.calib, r1_widths(chosen, recipe), o.seed)
        if o.rotate == "learned"
        else None,
    )
    resolved = replace(
        o,
        windows=windows,
        learn=learn,
        weight_method=weight_method,
        online_hadamard=online,
        split_outliers=split_outliers if splitting else 0.0,
        weight_block=recipe.weight_block,
        seq_len=prepared.seq_len,
    )
    pinned = dict(pins(prepared, resolved, recipe)) if pins else {}
    memory.release()  # what the pins were found on (a prepared KV graph: a cycle of IR objects)
    reasons = {name: CACHE_WHY for name in pinned if name not in overrides}
    overrides = {**pinned, **overrides}  # the user's map has the last word
    if learn is not None and prepared.structure is None:
        raise OnnxqError(
            "--learn needs the transformer structure, which was not recognised", "quantize without --learn"
        )
    model = prepared.model
    plan = build_plan(model, chosen, recipe, prepared.roles, prepared.structure, overrides, reasons)
    check_encodings_version(o.encodings_version, blocked=plan.has_blocked_weights())
    assert resolved.windows is not None
    calib_windows = data.cut(calib_tokens, o.calib, prepared.seq_len, resolved.windows)
    tick = progress("calibrating", len(calib_windows)) if progress else None
    t_cal = time.perf_counter()
    rotated = o.rotate != "none"
    targets: list[Any] = []  # end-to-end learning's: the float model's outputs on the windows it trains on
    keep = (learn.samples or 0) if learn is not None and learn.e2e_steps else 0

    def target(logits: Any) -> None:
        from calib.e2e import target_of

        if len(targets) < keep:
            targets.append(target_of(logits))

    observers = observe(
        model,
        plan,
        calib_windows.ids,
        histogram=lambda p: method_for(p, o.method, rotated) in ("mse", "percentile") or p.bits < 16,
        progress=tick,
        logits=target if keep else None,
    )
    scale_method = "mse" if use_gptq else weight_method
    encodings, stats = encode(model, plan, observers, method=o.method, weight_method=scale_method, rotated=rotated)
    memory.release()  # the weight search's temporaries, before the sensitivity pass builds its sim
    mixed: dict[str, Any] | None = None
    if o.budget is not None or o.weight_budget is not None:
        plan, mixed = choose_precision(
            model,
            plan,
            encodings,
            calib_windows.ids[: o.sensitivity_windows],
            budget=o.budget,
            weight_budget=o.weight_budget,
            by=o.budget_by,
            selector=o.selector,
            seed=o.seed,
            overrides=overrides,
            held=set(pinned),
            recipe=recipe,
            prepared=prepared,
            progress=progress,
        )
        encodings, stats = encode(
            model, plan, observers, method=o.method, weight_method=scale_method, rotated=rotated, previous=encodings
        )
        memory.release()  # the sensitivity pass's QuantSim and per-window tensors
    t_cal = time.perf_counter() - t_cal
    learned: dict[str, Any] | None = None
    if learn is not None:
        learned = {"config": asdict(learn), "layers": []}
        ids = calib_windows.ids
        train, heldout = ids[: learn.samples], ids[len(ids) - learn.holdout :]  # the guard's: never trained on
    if learn is not None and learn.steps:
        from calib.learn import learn as run_learning

        ticks = progress("learning (layers)", len(prepared.structure.layers)) if progress else None
        result = run_learning(
            model,
            prepared.structure,
            plan,
            encodings,
            train,
            calib_windows.ids,
            config=learn,
            method=o.method,
            down_in="r4" in online or splitting,
            progress=ticks,
            checkpoint=scratch / "checkpoint.pt",
        )
        encodings = result.encodings
        learned.update(seconds=round(result.seconds, 1), layers=result.history)
        del result
        memory.release()  # what learning freed, before GPTQ runs
    swept: int | None = None
    # the rounding group's: where GPTQ's last rounding targets lay between codes
    places: dict[str, np.ndarray] | None = {} if targets and learn and "rounding" in learn.e2e_groups else None
    if use_gptq:  # after layer-wise learning: the Hessians see the learned rotations
        ids = calib_windows.ids
        swept = round_by_layer(
            model, plan, encodings, ids, prepared.structure, sweeps=o.gptq_sweeps, places=places, progress=progress
        )
        memory.release()  # GPTQ's temporaries, before the QDQ model and its serialised copy are made
    if targets:
        encodings, learned["end_to_end"] = _end_to_end(
            model, plan, encodings, train, targets, heldout, learn, places, progress
        )
        del places
        memory.release()  # the mirror the stage trained in
    metadata = {
        "onnxq.calib": str(o.calib),
        "onnxq.rotate": o.rotate,
        "onnxq.online": ",".join(online),
        "onnxq.split_outliers": str(split_outliers) if splitting else "",
        "onnxq.outlier_channels": json.dumps(prepared.channels, sort_keys=True) if prepared.channels else "",
        "onnxq.seed": str(o.seed),
        "onnxq.learned_rotation": "true" if learn and learn.steps and learn.learn_rotation else "false",
    }
    model.metadata_props.update({"onnxq.seq_len": str(prepared.seq_len), **metadata})
    extras = {"weight_block": recipe.weight_block, "gptq_sweeps": swept, "learning": learned, "mixed_precision": mixed}
    return Run(resolved, recipe, prepared, plan, encodings, stats, calib_windows.ids, t_cal, extras, metadata, scratch)


def resolve_learning(config: LearnConfig | None, windows: int) -> LearnConfig | None:
    """Before any work: the windows learning trains on (by default :data:`LEARN_SAMPLES`, fewer where
    there are fewer) and those its guard holds out, which must not overlap."""
    if config is None:
        return None
    held = config.holdout if config.e2e_steps else 0
    if config.samples is None:
        config = replace(config, samples=max(1, min(LEARN_SAMPLES, windows - held)))
    assert config.samples is not None
    if config.samples + held > windows:
        raise OnnxqError(
            f"--samples {config.samples} and --holdout {held} need {config.samples + held} calibration windows,"
            f" and there are {windows}",
            f"pass --windows {config.samples + held} or more, or fewer --samples",
        )
    return config


def _end_to_end(
    model: ir.Model,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    train: np.ndarray,
    targets: list[Any],
    heldout: np.ndarray,
    config: LearnConfig,
    places: dict[str, np.ndarray] | None,
    progress: Progress | None,
) -> tuple[dict[str, Encoding], dict[str, Any]]:
    """Stage 3 of ``--learn`` (:mod:`calib.e2e`): the encodings to keep, and what summary.json reports."""
    from calib.e2e import finetune

    ticks = progress("learning (end to end)", config.e2e_steps) if progress else None
    result = finetune(model, plan, encodings, train, targets, heldout, config=config, places=places, progress=ticks)
    for name, values in result.weights.items():  # the weights whose steps it learned, on their new grid
        model.graph.initializers[name].const_value = ir.tensor(values, name=name)
    report = {
        "kept": result.kept,
        "heldout_nll_before": round(result.heldout_before, 6),
        "heldout_nll_after": round(result.heldout_after, 6),
        "trained": result.trained,
        "seconds": round(result.seconds, 1),
        "loss": result.history,
    }
    return result.encodings, report


def write_run(
    run: Run,
    output: Path,
    graphs: Mapping[str, ir.Model],
    inputs: list[Path],
    *,
    source: Path,
    started: float,
    overwrite: bool,
    summary: Mapping[str, Any] | None = None,
) -> QuantizeResult:
    """Write ``graphs`` (file name -> QDQ model) with the run's summary, recipe and encodings.

    ``inputs``: the float graphs read (hashed into the recipe); ``source``: what was quantized (a
    model or a folder), whose side files (tokenizer, config) are copied along.
    """
    o = run.resolved
    info = _summary(run, source, time.perf_counter() - started)
    info.update(run.summary)
    info.update(summary or {})
    files = write_quantized(
        output,
        graphs,
        plan=run.plan,
        encodings=run.encodings,
        encodings_version=o.encodings_version,
        source=source if source.is_dir() else source.parent,
        summary=info,
        recipe=recipe_text(o, inputs, run.calib_ids, sweeps=run.summary["gptq_sweeps"]),
        started=started,
        overwrite=overwrite,
    )
    shutil.rmtree(run.scratch, ignore_errors=True)
    return QuantizeResult(output, files, info, run.plan, run.encodings)


def _summary(run: Run, source: Path, seconds: float) -> dict[str, Any]:
    """``summary.json``: what the run did, by the numbers (the writer adds files, time and memory)."""
    o, plan = run.resolved, run.plan
    dtypes: dict[str, int] = {}
    for p in plan.points.values():
        key = f"{p.kind}:{p.spec.qtype.value}"
        dtypes[key] = dtypes.get(key, 0) + 1
    clipped = sorted(((s.clipped, name) for name, s in run.stats.items()), reverse=True)[:10]
    return {
        "onnxq": "summary/1",
        "input": str(source),
        "preset": plan.preset.name,
        "seq_len": run.prepared.seq_len,
        "rotation": {"offline": o.rotate, "online": list(o.online_hadamard or ()), "seed": o.seed},
        "structure": run.prepared.structure.describe() if run.prepared.structure else None,
        "rewrites": [r.summary() for r in run.prepared.rewrites],
        "notes": run.prepared.notes,
        "calibration": {
            "data": o.calib,
            "windows": len(run.calib_ids),
            "method": o.method,
            "weights": o.weight_method,
            "seconds": round(run.calib_seconds, 2),
        },
        "counts": plan.counts(),
        "dtypes": dtypes,
        "most_clipped": [{"point": n, "fraction": round(c, 6)} for c, n in clipped if c > 0],
        "quantize_seconds_before_save": round(seconds, 2),
    }

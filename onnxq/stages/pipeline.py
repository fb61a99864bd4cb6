"""``onnxq quantize``: float ONNX in, QDQ ONNX with fixed scales out.

A run is a list of stages, each taking the options and what the stage before it made: prepare
(:mod:`~onnxq.stages.prepare`: canonical rewrites, structure, rotations, the outlier split), plan
(:mod:`onnxq.plan`), calibrate (:mod:`calib.calibrate`), choose precisions (:mod:`~onnxq.stages.mixed`),
learn (:mod:`calib.learn`), round the weights (:mod:`~onnxq.stages.weights`), emit
(:mod:`~onnxq.stages.qdq`) and write (:mod:`~onnxq.stages.outputs`). A KV-cache folder goes through
the same stages in :mod:`~onnxq.stages.pipeline_kv`. The input file is never touched.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxq.core import ir as oir
from onnxq.core import memory, recipes
from onnxq.core import presets as presets_mod
from onnxq.core.errors import OnnxqError
from onnxq.core.files import check_new_output
from onnxq.core.options import DEFAULT_WINDOWS, GPTQ_WINDOWS, QuantizeOptions
from onnxq.plan import build_plan, read_precision_map
from onnxq.stages.outputs import write_quantized
from onnxq.stages.pipeline_kv import is_kv_folder, quantize_kv
from onnxq.stages.qdq import emit_qdq

if TYPE_CHECKING:
    pass

from onnxq.stages.mixed import choose_precision
from onnxq.stages.prepare import Progress, outlier_chooser, prepare, r1_refiner
from onnxq.stages.resolve import check_encodings_version, r1_widths, resolve_online, resolve_weight_method, with_block
from onnxq.stages.results import QuantizeResult, build_summary, recipe_text
from onnxq.stages.weights import apply_gptq, gptq_inputs

log = logging.getLogger(__name__)


def quantize(
    model_path: str | Path,
    output: str | Path,
    options: QuantizeOptions | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    **changes: Any,
) -> QuantizeResult:
    """Quantize the float ONNX model at ``model_path`` (or a KV-cache folder) into the folder ``output``.

    ``options`` default to :class:`~onnxq.core.options.QuantizeOptions`; keyword arguments set or change
    fields of it (``quantize(m, out, preset="w4a8")``). Writes ``model.qdq.onnx``,
    ``precision_map.json`` (editable, accepted back with ``precision_map=``), ``encodings.json``
    (onnxq's, by quantization point), ``model.encodings`` (AIMET's, by tensor, for QAIRT),
    ``recipe.toml`` (the options as resolved: replays the run) and ``summary.json``, plus the
    tokenizer files.
    """
    from calib import data
    from calib.calibrate import encode, method_for, observe
    from onnxq.core.sources import tokenizer_for

    start = time.perf_counter()
    o = replace(options or QuantizeOptions(), **changes)  # validated here, once
    model_path = Path(model_path)
    output = Path(output)
    chosen = presets_mod.get(o.preset)
    if is_kv_folder(model_path):
        unsupported = [
            f
            for f, on in (
                ("--learn", o.learn),
                ("--budget", o.budget),
                ("--weight-budget", o.weight_budget),
                ("--rotate learned", o.rotate == "learned"),
            )
            if on
        ]
        if unsupported:
            raise OnnxqError(
                f"{', '.join(unsupported)} is not supported for KV-cache graphs yet",
                "quantize the scoring graph of `onnxq export` for that",
            )
        return quantize_kv(model_path, output, o, overwrite=overwrite, progress=progress)
    check_new_output(output, overwrite=overwrite, inputs=[model_path])
    overrides = read_precision_map(o.precision_map) if o.precision_map else None
    float_model = oir.load(model_path)
    if "onnxq.kv_slots" in float_model.metadata_props:
        raise OnnxqError(
            f"{model_path} is one graph of a KV-cache pair",
            f"quantize the folder holding prefill.onnx and decode.onnx: onnxq quantize {model_path.parent}",
        )
    recipe = with_block(recipes.for_model_type(float_model.metadata_props.get("onnxq.model_type")), o.weight_block)
    if chosen.weight_bits == 4 and recipe.weight_block:  # before any data is read (outliers, calibration)
        check_encodings_version(o.encodings_version, blocked=True)
    # the family's default (Llama: 16); 16-bit inputs have the range already
    split_outliers = recipe.split_outliers if o.split_outliers is None else o.split_outliers
    splitting = split_outliers > 0 and chosen.act_bits < 16
    online = resolve_online(o, chosen, recipe)
    prepared = prepare(
        float_model,
        seq_len=o.seq_len,
        mask_value=o.mask_value,
        rotate=o.rotate,
        online=online,
        seed=o.seed,
        where=str(model_path),
        outliers=outlier_chooser(lambda: tokenizer_for(model_path, o.tokenizer), o.calib, split_outliers)
        if splitting
        else None,
        refine_r1=r1_refiner(lambda: tokenizer_for(model_path, o.tokenizer), o.calib, r1_widths(chosen, recipe), o.seed)
        if o.rotate == "learned"
        else None,
    )
    model = prepared.model
    plan = build_plan(model, chosen, recipe, prepared.roles, prepared.structure, overrides)
    check_encodings_version(o.encodings_version, blocked=plan.has_blocked_weights())
    weight_method = resolve_weight_method(o, chosen)
    use_gptq = weight_method == "gptq"
    windows = o.windows or (GPTQ_WINDOWS if use_gptq else DEFAULT_WINDOWS)  # GPTQ's Hessians want more data
    tok = tokenizer_for(model_path, o.tokenizer)
    calib_windows = data.windows(tok, o.calib, prepared.seq_len, windows)
    tick = progress("calibrating", len(calib_windows)) if progress else None
    t_cal = time.perf_counter()
    rotated = o.rotate != "none"
    # With learning, GPTQ's inputs are gathered after it, on the learned model: the Hessians (~0.8 GB
    # on SmolLM2) are then never held while learning runs, and they see the learned rotations.
    hessians = gptq_inputs(model, plan) if use_gptq and o.learn is None else None
    observers = observe(
        model,
        plan,
        calib_windows.ids,
        histogram=lambda p: method_for(p, o.method, rotated) in ("mse", "percentile") or p.bits < 16,
        hessians=hessians,
        progress=tick,
    )
    scale_method = "mse" if use_gptq else weight_method
    encodings, stats = encode(model, plan, observers, method=o.method, weight_method=scale_method, rotated=rotated)
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
    if o.learn is not None:
        if prepared.structure is None:
            raise OnnxqError(
                "--learn needs the transformer structure, which was not recognised", "quantize without --learn"
            )
        from calib.learn import learn as run_learning

        ticks = progress("learning (layers)", len(prepared.structure.layers)) if progress else None
        result = run_learning(
            model,
            prepared.structure,
            plan,
            encodings,
            calib_windows.ids[: o.learn.samples],
            calib_windows.ids,
            config=o.learn,
            method=o.method,
            down_in="r4" in online or splitting,
            progress=ticks,
            checkpoint=output.parent / f".{output.name}.learn" / "checkpoint.pt",
        )
        encodings = result.encodings
        learned = {"config": asdict(o.learn), "seconds": round(result.seconds, 1), "layers": result.history}
        del result
        memory.release()  # what learning freed, before GPTQ's Hessians (~0.8 GB) are gathered
    swept: int | None = None
    if use_gptq:
        if hessians is None:
            hessians = gptq_inputs(model, plan)
            tick = progress("GPTQ inputs", len(calib_windows)) if progress else None
            observe(model, plan, calib_windows.ids, histogram=lambda _: False, hessians=hessians, progress=tick)
        swept = apply_gptq(model, plan, encodings, hessians, sweeps=o.gptq_sweeps)
        memory.release()  # GPTQ's temporaries, before the QDQ model and its serialised copy are made
    emit_qdq(model, plan, encodings)
    model.metadata_props.update(
        {
            "onnxq.seq_len": str(prepared.seq_len),
            "onnxq.calib": str(o.calib),
            "onnxq.rotate": o.rotate,
            "onnxq.online": ",".join(online),
            "onnxq.split_outliers": str(split_outliers) if splitting else "",
            "onnxq.seed": str(o.seed),
            "onnxq.learned_rotation": "true" if o.learn is not None and o.learn.learn_rotation else "false",
        }
    )
    summary = build_summary(
        model_path,
        chosen.name,
        plan,
        prepared,
        o.calib,
        len(calib_windows),
        o.method,
        weight_method,
        stats,
        time.perf_counter() - start,
        t_cal,
        {"offline": o.rotate, "online": list(online), "seed": o.seed},
    )
    summary["weight_block"] = recipe.weight_block
    summary["gptq_sweeps"] = swept
    summary["learning"] = learned
    summary["mixed_precision"] = mixed
    files = write_quantized(
        output,
        {"model.qdq.onnx": model},
        plan=plan,
        encodings=encodings,
        encodings_version=o.encodings_version,
        source=model_path.parent,
        summary=summary,
        recipe=recipe_text(
            replace(
                o,
                windows=windows,
                weight_method=weight_method,
                online_hadamard=online,
                split_outliers=split_outliers if splitting else 0.0,
                weight_block=recipe.weight_block,
                seq_len=prepared.seq_len,
            ),
            [model_path],
            calib_windows.ids,
            sweeps=swept,
        ),
        started=start,
        overwrite=overwrite,
    )
    if o.learn is not None:
        shutil.rmtree(output.parent / f".{output.name}.learn", ignore_errors=True)
    return QuantizeResult(output, files, summary, plan, encodings)


#: calibration tokens per input channel below which GPTQ's refinement sweeps are skipped
SWEEP_TOKENS_PER_INPUT = 2

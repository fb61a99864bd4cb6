"""``onnxq quantize``: float ONNX in, QDQ ONNX with fixed scales out.

export → canonical rewrites → structure → plan → calibrate → emit → save. Each step is a function
of the previous step's output; the input file is never touched.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core import memory, recipes
from onnxq.core import presets as presets_mod
from onnxq.core.errors import OnnxqError
from onnxq.core.files import check_new_output
from onnxq.core.options import DEFAULT_WINDOWS, GPTQ_WINDOWS, ROTATIONS, QuantizeOptions, recipe_toml, sha256_file
from onnxq.core.qtypes import Encoding
from onnxq.plan import QuantPlan, build_plan, read_precision_map
from onnxq.stages.outputs import write_quantized
from onnxq.stages.pipeline_kv import is_kv_folder, quantize_kv
from onnxq.stages.qdq import emit_qdq

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


def _windows_of(model: ir.Model, tokenizer: Callable[[], Any], calib: str, count: int) -> Any:
    """``count`` calibration windows at the model's own (static) sequence length."""
    from calib import data

    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    assert ids.shape is not None
    return data.windows(tokenizer(), calib, int(ids.shape[1]), count).ids


def outlier_chooser(
    tokenizer: Callable[[], Any],
    calib: str,
    ratio: float,
    limit: int = DEFAULT_OUTLIER_LIMIT,
    *,
    feeds: Callable[[np.ndarray], Any] | None = None,
    length: int | None = None,
) -> OutlierChooser:
    """Pick each layer's outlier channels from peaks over a few calibration windows of the float model.

    ``tokenizer`` is loaded only when the chooser runs, after the model's own checks. A KV-cache step
    graph gives ``length`` (its windows' tokens) and ``feeds`` (the windows stepped through its cache).
    """
    from calib import data
    from calib.peaks import channel_peaks

    def choose(model: ir.Model, structure: Structure) -> dict[int, list[int]]:
        if feeds is None:
            windows = _windows_of(model, tokenizer, calib, OUTLIER_WINDOWS)
        else:
            assert length is not None
            windows = feeds(data.windows(tokenizer(), calib, length, OUTLIER_WINDOWS).ids)
        inputs = {layer.index: layer.mlp.down.input for layer in structure.layers}
        peaks = channel_peaks(model, list(inputs.values()), windows)
        return {i: choose_channels(peaks[name], ratio, limit) for i, name in inputs.items()}

    return choose


def r1_refiner(tokenizer: Callable[[], Any], calib: str, widths: Widths, seed: int) -> R1Refiner:
    """Learn R1 on top of the Hadamard one (:mod:`calib.residual`) from a few calibration windows."""
    from calib.residual import learn_r1

    def refine(model: ir.Model, structure: Structure) -> tuple[np.ndarray, str]:
        windows = _windows_of(model, tokenizer, calib, R1_WINDOWS)
        result = learn_r1(model, structure, windows, widths, seed=seed)
        verdict = "kept" if result.kept else "not kept (no lower)"
        note = f"R1 learned on top: stream linears' error {result.before:.4g} -> {result.after:.4g}, {verdict}"
        return result.rotation, note

    return refine


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote and measured."""

    output: Path
    files: list[Path]
    summary: dict[str, Any]
    plan: QuantPlan
    encodings: dict[str, Encoding] = field(repr=False, default_factory=dict)


@dataclass
class Prepared:
    """A float model brought to canonical form, with what the rewrites found."""

    model: ir.Model
    seq_len: int
    structure: Structure | None
    roles: dict[str, Any]
    rewrites: list[RewriteResult]
    notes: list[str]


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
    if outliers is not None:
        split = split_outlier_channels(model, structure, outliers(model, structure))
        results.append(split)
        if split.modified:
            notes.append("down_proj input channels on the 16-bit side path: " + "; ".join(split.notes))
            structure = discover(model)
    if online:
        results.append(online_hadamard(model, structure, list(online), seed))
        structure = discover(model)
    roles = tensor_roles(model, structure)
    return Prepared(model, seq_len, structure, roles, results, notes)


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


def choose_precision(
    model: ir.Model,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    windows: Any,
    *,
    budget: float | None,
    weight_budget: float | None = None,
    by: str,
    selector: str,
    seed: int,
    overrides: dict[str, int] | None,
    recipe: recipes.Recipe,
    prepared: Prepared,
    progress: Progress | None = None,
) -> tuple[QuantPlan, dict[str, Any]]:
    """Score the 8-bit MatMul inputs (and 4-bit weights), promote the best within the budgets, re-plan.

    Returns the new plan and the summary's ``mixed_precision`` record.
    """
    from calib.qsim import QuantSim
    from calib.sensitivity import measured_gain, relative_and_fisher
    from onnxq.stages import mixed

    if selector not in mixed.SELECTORS:
        raise OnnxqError(f"unknown selector {selector!r}", f"use one of: {', '.join(mixed.SELECTORS)}")
    acts = mixed.candidates(plan, model) if budget is not None else []
    wts = mixed.weight_candidates(plan) if weight_budget is not None else []
    scores: dict[str, float] = {}
    if (acts or wts) and selector != "random":
        sim = QuantSim(model, plan, encodings)
        tick = progress("sensitivity", len(windows)) if progress else None
        both = relative_and_fisher(sim, acts, windows, progress=tick, weights=mixed.weight_edges(model, wts))
        scores = {n: (rel if selector == "relative" else fis) for n, (rel, fis) in both.items()}
        if selector == "measured" and acts:
            assert budget is not None
            top = sorted(acts, key=lambda p: -scores[p.name])[: max(8, int(len(acts) * budget * 2) + 1)]
            tick = progress("measuring", len(top)) if progress else None
            gains = measured_gain(sim, top, windows, progress=tick)
            scores.update({p.name: gains.get(p.name, 0.0) for p in acts})
    promoted: dict[str, int] = {}
    record: dict[str, Any] = {"selector": selector, "by": by}
    if budget is not None:
        choice = mixed.choose(acts, scores, mixed.macs(model, plan), budget, by=by, selector=selector, seed=seed)
        promoted.update(dict.fromkeys(choice.promoted, 16))
        record.update(budget=budget, promoted=list(choice.promoted), scores=_rounded(scores, acts))
    if weight_budget is not None:
        sizes = mixed.weight_sizes(model, wts)
        wchoice = mixed.choose(wts, scores, sizes, weight_budget, by=by, selector=selector, seed=seed)
        promoted.update(dict.fromkeys(wchoice.promoted, 8))
        record.update(
            weight_budget=weight_budget, promoted_weights=list(wchoice.promoted), weight_scores=_rounded(scores, wts)
        )
    reasons = dict.fromkeys(promoted, f"promoted ({selector})")
    merged = {**(overrides or {}), **promoted}
    new_plan = build_plan(model, plan.preset, recipe, prepared.roles, prepared.structure, merged, reasons)
    return new_plan, record


def _rounded(scores: dict[str, float], points: list[Any]) -> dict[str, float]:
    """Scores of ``points``, highest first, to 4 significant digits (for summary.json)."""
    mine = {p.name: scores.get(p.name, 0.0) for p in points}
    return {k: float(f"{v:.4g}") for k, v in sorted(mine.items(), key=lambda kv: -kv[1])}


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


def gptq_inputs(model: ir.Model, plan: QuantPlan) -> dict[str, Any]:
    """A Hessian observer for the input of every linear with a planned per-channel weight."""
    from calib.gptq import HessianObserver, supported

    inputs: dict[str, Any] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.metadata_props.get("onnxq.online_rotation"):
            continue
        weight = node.inputs[1]
        point = plan.points.get(weight.name) if weight is not None else None
        if point is not None and point.kind == "weight" and supported(point.spec):
            inputs.setdefault(node.inputs[0].name, HessianObserver())
    return inputs


#: calibration tokens per input channel below which GPTQ's refinement sweeps are skipped
SWEEP_TOKENS_PER_INPUT = 2


def apply_gptq(
    model: ir.Model,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    hessians: dict[str, Any],
    *,
    sweeps: int | None = None,
) -> int | None:
    """Replace each planned weight by its GPTQ rounding (on its encoding's grid).

    Returns the refinement sweeps run on the 4-bit weights (the most any got; None: no 4-bit weight),
    which is what summary.json reports. ``hessians`` is consumed: each goes once its last linear is rounded.

    The coordinate-descent sweeps after GPTQ (``sweeps``, default :data:`calib.gptq.SWEEPS`) run on
    4-bit weights only: at 8 bits rounding is already fine, and lm_head's 49k columns make them slow.
    They minimise the error on the calibration inputs exactly, so with fewer than
    :data:`SWEEP_TOKENS_PER_INPUT` tokens per input channel they are skipped: on synthetic layers
    they then raise the error on new inputs (0.75 tokens per input: +2 %; 2: -2 %; 16: -6 %).
    """
    from calib.gptq import SWEEPS, gptq, supported

    done = 0
    swept: int | None = None
    linears = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.metadata_props.get("onnxq.online_rotation"):
            continue
        weight = node.inputs[1]
        point = plan.points.get(weight.name) if weight is not None else None
        if point is not None and point.kind == "weight" and supported(point.spec):
            linears.append((node.inputs[0].name, weight, point))
    readers = Counter(name for name, _, _ in linears)
    for name, weight, point in linears:
        obs = hessians.get(name)
        readers[name] -= 1
        if not readers[name]:  # its last reader (q/k/v share one): the Hessian goes before lm_head's big one
            hessians.pop(name, None)
        if obs is None or obs.h is None:
            continue
        polish = 0
        if point.spec.bits <= 4:
            enough = obs.n >= SWEEP_TOKENS_PER_INPUT * obs.h.shape[0]  # else the sweeps would fit noise
            polish = (SWEEPS if sweeps is None else sweeps) if enough else 0
            swept = max(swept or 0, polish)
        values = gptq(weight.const_value.numpy(), encodings[point.name], obs.hessian(), sweeps=polish)
        weight.const_value = ir.tensor(values, name=weight.name)
        done += 1
    log.info("GPTQ rounded %d weights (refinement sweeps on 4-bit weights: %s)", done, swept)
    return swept

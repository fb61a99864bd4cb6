"""The ``onnxq`` command line: export, quantize, eval, report, validate, compile, generate, package, check, diff.

Everything here is presentation (argument parsing, progress bars, the summary table, ``--json``);
the work is done by the library functions it calls, which are the same ones the Python API exposes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from onnxq import __version__
from onnxq.core.errors import OnnxqError
from onnxq.core.options import E2E_GROUPS, LEARN_SAMPLES, LearnConfig

log = logging.getLogger("onnxq")

#: the commands that build a model: they need torch and transformers, which the base install leaves out
BUILDS = frozenset({"export", "quantize", "report", "diff"})

#: each command's examples, the end of its --help; the first of each, in this order, end `onnxq --help`
EXAMPLES = {
    "export": [
        "onnxq export -o smollm2/model.onnx                 # the embedded SmolLM2-135M, 512 tokens",
        "onnxq export Qwen/Qwen2.5-0.5B -o qwen/model.onnx --seq-len 1024",
        "onnxq export --kv-cache -o smollm2-kv              # prefill + decode pair, and the scoring graph",
    ],
    "quantize": [
        "onnxq quantize smollm2/model.onnx -o smollm2-w8a16 --preset w8a16",
        "onnxq quantize smollm2/model.onnx -o smollm2-w4a8 --preset w4a8 --learn   # with end-to-end learning",
        "onnxq quantize smollm2-kv -o smollm2-kv-w8a16 --preset w8a16   # the pair, with the scoring graph's encodings",
        "onnxq quantize smollm2/model.onnx --recipe smollm2-w4a8/recipe.toml -o again   # the same bytes again",
    ],
    "eval": [
        "onnxq eval smollm2-w8a16/model.qdq.onnx --ppl wikitext2 --windows 40",
        "onnxq eval smollm2/model.onnx smollm2-w8a16/model.qdq.onnx --tasks piqa,hellaswag --limit 500",
        "onnxq eval smollm2-w8a16/model.qdq.onnx --ep qnn --windows 2   # on the HTP backend",
    ],
    "validate": [
        "onnxq validate smollm2-w8a16/model.qdq.onnx",
        "onnxq validate smollm2-w8a16/model.qdq.onnx --context smollm2-w8a16/ctx --soc-model 60",
        "onnxq validate smollm2-kv-w8a16                    # the pair, run as a generator runs it",
    ],
    "compile": [
        "onnxq compile smollm2-w8a16/model.qdq.onnx -o smollm2-w8a16/htp --soc-model 60",
        "onnxq compile smollm2-kv-w8a16 -o smollm2-kv-htp --parts 2   # each graph in two context binaries",
    ],
    "generate": [
        'onnxq generate smollm2-kv --prompt "The capital of France is"',
        'onnxq generate smollm2-kv-w8a16 --prompt "The capital of France is" --ep qnn',
    ],
    "package": ["onnxq package smollm2-kv-w8a16 -o smollm2-genai   # a folder onnxruntime-genai loads"],
    "check": [
        "onnxq check smollm2-w8a16/model.qdq.onnx",
        "onnxq check smollm2-w8a16/model.qdq.onnx --encodings smollm2-w8a16/model.encodings",
    ],
    "diff": ["onnxq diff smollm2/model.onnx smollm2-w8a16/model.qdq.onnx --ep qnn"],
    "report": ["onnxq report smollm2-w8a16 --model smollm2/model.onnx"],
}


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions as usual and keeps the lines of the examples."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _examples(lines: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# --------------------------------------------------------------------------- presentation helpers
class _Progress:
    """tqdm bars on stderr, or nothing with --quiet / --json."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: list[Any] = []

    def __call__(self, label: str, total: int) -> Callable[..., None]:  # a tick: (count, optional note)
        if not self.enabled:
            return lambda _n, _note=None: None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="win", leave=False, file=sys.stderr, dynamic_ncols=True)
        self.bars.append(bar)

        def tick(n: int, note: str | None = None) -> None:
            if note is not None:  # e.g. learning's loss, shown after the bar
                bar.set_postfix_str(note, refresh=False)
            bar.update(n)

        return tick

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def _stages(args: argparse.Namespace) -> Callable[[str], None] | None:
    """A one-line-per-stage progress display for steps that have no countable units."""
    if args.quiet or args.json:
        return None
    start = time.perf_counter()

    def show(stage: str) -> None:
        print(f"  [{time.perf_counter() - start:5.0f} s] {stage} ...", file=sys.stderr, flush=True)

    return show


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: Sequence[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=1, default=str), file=args.json_out, flush=True)
    else:  # --quiet drops progress and logs, never the result
        print("\n".join(lines))


def _mb(path: Path) -> str:
    size = path.stat().st_size if path.exists() else 0
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 1024:.0f} kB"


def _rows(pairs: Sequence[tuple[str, str]]) -> list[str]:
    width = max(15, *(len(k) for k, _ in pairs))  # one column across the several calls of a table
    return [f"  {k:<{width}}  {v}" for k, v in pairs]


# --------------------------------------------------------------------------- commands
def cmd_export(args: argparse.Namespace) -> int:
    from onnxq.stages.export import export

    if args.kv_cache:
        return _export_kv(args)
    result = export(
        args.model,
        args.output,
        seq_len=args.seq_len,
        mask_value=args.mask_value,
        overwrite=args.overwrite,
        progress=_stages(args),
    )
    data = {
        "output": str(result.path),
        "files": [str(f) for f in result.files],
        "seq_len": result.seq_len,
        "max_abs_diff_vs_transformers": result.max_abs_diff,
        "seconds": round(result.seconds, 1),
        "nodes": result.nodes,
        "op_counts": result.op_counts,
    }
    lines = [f"onnxq export: {args.model or 'SmolLM2-135M-Instruct (default)'} -> {result.path}"]
    lines += _rows(
        [
            ("graph", f"{result.nodes} nodes, input_ids [1, {result.seq_len}] -> logits, opset 21"),
            ("exactness", f"max |onnx - transformers| = {result.max_abs_diff:.2g} (float32)"),
            ("files", ", ".join(f"{f.name} ({_mb(f)})" for f in result.files)),
            ("time", f"{result.seconds:.0f} s"),
        ]
    )
    _emit(args, data, lines)
    return 0


#: quantize's flags (argparse dests) that are not options of the recipe; --recipe refuses every other one
NOT_RECIPE = frozenset(
    {"command", "func", "parser", "json_out", "verbose", "quiet", "json", "model", "output", "overwrite", "recipe"}
    | {"no_report", "eval_windows"}  # what is written beside the model, not how it is made
)


def _quantize_options(args: argparse.Namespace) -> Any:
    """The options of ``onnxq quantize``: from ``--recipe``, or from the flags."""
    from onnxq.core.options import QuantizeOptions, read_recipe, sha256_file

    if args.recipe:
        given = [
            f"--{d.replace('_', '-')}"
            for d, value in vars(args).items()
            if d not in NOT_RECIPE and value != args.parser.get_default(d)
        ]
        if given:
            raise OnnxqError(
                f"--recipe sets every option, and {', '.join(given)} would change it",
                "edit the recipe (or a copy), or drop --recipe",
            )
        recipe = read_recipe(args.recipe)
        model = Path(args.model)
        if model.is_file() and sha256_file(model) not in recipe.inputs.values():
            log.warning("%s is not the model %s was written for (sha256 differs)", model, args.recipe)
        return recipe.options
    learn = None
    if args.learn:
        learn = LearnConfig(
            steps=args.steps,
            lr=args.lr,
            samples=args.samples,
            learn_rotation=not args.no_learn_rotation,
            e2e_steps=args.e2e_steps,
            e2e_lr=args.e2e_lr,
            e2e_groups=tuple(g.strip() for g in args.e2e_groups.split(",") if g.strip()),
            holdout=args.holdout,
            seed=args.seed,
            device=args.device,
        )
    return QuantizeOptions(
        preset=args.preset,
        calib=args.calib,
        windows=args.windows,
        method=args.method,
        weight_method=args.weight_method,
        precision_map=args.precision_map,
        seq_len=args.seq_len,
        mask_value=args.mask_value,
        rotate=args.rotate,
        seed=args.seed,
        online_hadamard=None
        if args.online_hadamard is None
        else tuple(w.strip() for w in args.online_hadamard.split(",") if w.strip() not in ("", "none")),
        split_outliers=args.split_outliers,
        weight_block=args.weight_block,
        gptq_sweeps=args.gptq_sweeps,
        learn=learn,
        budget=args.budget,
        weight_budget=args.weight_budget,
        budget_by=args.budget_by,
        selector=args.selector,
        sensitivity_windows=args.sensitivity_windows,
        tokenizer=args.tokenizer,
        encodings_version=args.encodings_version,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from onnxq.stages.pipeline import quantize

    options = _quantize_options(args)
    model = Path(args.model)
    output = Path(args.output) if args.output else model.with_name(f"{model.stem}-{options.preset}")
    progress = _Progress(not (args.quiet or args.json))
    try:
        result = quantize(model, output, options, overwrite=args.overwrite, progress=progress)
    finally:
        progress.close()
    s = result.summary
    counts = s["counts"]
    files = [output / f for f in s["files"]]
    lines = [
        f"onnxq quantize: {args.model} -> {output}/  (preset {s['preset']}, {s['seconds']:.0f} s, "
        f"peak RSS {s['peak_rss_mb']} MB)"
    ]
    lines += _rows(
        [
            ("structure", s["structure"] or "not recognised (op-type roles)"),
            ("rewrites", "; ".join(r for r in s["rewrites"] if "nothing" not in r) or "none needed"),
            (
                "rotation",
                f"{s['rotation']['offline']}"
                + (f" + online {','.join(s['rotation']['online'])}" if s["rotation"]["online"] else ""),
            ),
            (
                "activations",
                f"{counts['activation points']} points: {counts['int16 activations']} int16, "
                f"{counts['int8 activations']} int8, {counts['converts']} converts",
            ),
            ("weights", _weights_line(counts, s)),
            ("MatMul work", ", ".join(f"{k} {v:g} %" for k, v in s.get("macs", {}).items()) or "not measured"),
            (
                "calibration",
                f"{s['calibration']['data']}, {s['calibration']['windows']} windows x {s['seq_len']}, "
                f"{s['calibration']['method']}, {s['calibration']['seconds']:.0f} s",
            ),
            ("mixed precision", _mixed_line(s.get("mixed_precision"))),
            ("learning", _learn_line(s.get("learning"))),
            ("files", ", ".join(f"{f.name} ({_mb(f)})" for f in files)),
            ("recipe", f"{output / 'recipe.toml'} (replay: onnxq quantize MODEL --recipe it -o OUT)"),
        ]
    )
    scoring = str(model / "model.onnx") if model.is_dir() else args.model  # a KV folder's scoring graph
    if args.eval_windows > 0 and (output / "model.qdq.onnx").exists():
        s["eval"] = _float_vs_quantized(scoring, output / "model.qdq.onnx", args.eval_windows, args)
        e = s["eval"]
        lines += _rows(
            [
                (
                    "perplexity",
                    f"wikitext2, {e['windows']} windows: float {e['float']:.3f} -> quantized {e['quantized']:.3f} "
                    f"(x{e['quantized'] / e['float']:.3f}; --eval-windows 0 to skip)",
                )
            ]
        )
    if not args.no_report and (output / "model.qdq.onnx").exists():
        rep = _report(output, scoring, args.calib, args.tokenizer, quiet=args.quiet or args.json)
        s["report"] = str(rep.html)
        s["files"] = sorted([*s["files"], rep.html.name, "report"])
        lines += _rows([("report", f"{rep.html} ({len(rep.figures)} figures; --no-report to skip)")])
    _emit(args, s, lines)
    return 0


def _float_vs_quantized(model: str, qdq: Path, count: int, args: argparse.Namespace) -> dict[str, Any]:
    """WikiText-2 perplexity of the float and the quantized model on the same first ``count`` windows."""
    from calib.data import windows
    from onnxq.core.sources import tokenizer_for
    from onnxq.evaluation.evaluate import perplexity

    ids = windows(tokenizer_for(qdq, args.tokenizer), "wikitext2", _model_seq_len(str(qdq)), count).ids
    progress = _Progress(not (args.quiet or args.json))
    try:
        fp = perplexity(model, ids, progress=progress("float ppl", len(ids))).ppl
        q = perplexity(qdq, ids, progress=progress("quantized ppl", len(ids))).ppl
    finally:
        progress.close()
    return {"dataset": "wikitext2", "windows": len(ids), "float": fp, "quantized": q}


def _weights_line(counts: dict[str, int], s: dict[str, Any]) -> str:
    line = f"{counts['weights int8']} int8 per channel"
    if not counts["weights int4"]:
        return line + ", symmetric"
    line += f", {counts['weights int4']} int4"
    blocked = counts.get("weights int4 per block", 0)
    line += f" ({blocked} per block of {s.get('weight_block')} rows, LPBQ)" if blocked else " per channel"
    sweeps = s.get("gptq_sweeps")
    rounding = "" if sweeps is None else ", GPTQ" + (f" + {sweeps} refinement sweeps" if sweeps else "")
    return line + ", symmetric" + rounding


def _mixed_line(mixed: dict[str, Any] | None) -> str:
    if not mixed:
        return "off (--budget / --weight-budget to promote the most sensitive 8-bit inputs / 4-bit weights)"
    parts = []
    if "promoted" in mixed:
        parts.append(
            f"{len(mixed['promoted'])} of {len(mixed['scores']) or '?'} 8-bit MatMul inputs to 16 bits "
            f"(budget {mixed['budget']:g})"
        )
    if "promoted_weights" in mixed:
        parts.append(
            f"{len(mixed['promoted_weights'])} of {len(mixed['weight_scores']) or '?'} 4-bit weights to 8 bits "
            f"(budget {mixed['weight_budget']:g})"
        )
    return "; ".join(parts) + f", {mixed['selector']}, by {mixed['by']}"


def _learn_line(learned: dict[str, Any] | None) -> str:
    if not learned:
        return "off (--learn to learn the weights' steps end to end)"
    parts = []
    layers = learned.get("layers", [])
    if layers:
        before = sum(layer["eval_before"] for layer in layers)
        after = sum(layer["eval"] for layer in layers)
        parts.append(f"{len(layers)} layers, {learned['seconds']:.0f} s, layer error {before:.3g} -> {after:.3g}")
    e2e = learned.get("end_to_end")
    if e2e:
        verdict = "kept" if e2e["kept"] else "worse there, so the model before it is kept"
        parts.append(
            f"end to end {len(e2e['loss'])} steps, {e2e['seconds']:.0f} s, held-out NLL "
            f"{e2e['heldout_nll_before']:.4f} -> {e2e['heldout_nll_after']:.4f} ({verdict})"
        )
    return "; ".join(parts)


def _tokenizer_or_none(model: str, explicit: str | None) -> Any:
    from onnxq.core.sources import tokenizer_for

    try:
        return tokenizer_for(model, explicit)
    except OnnxqError:
        if explicit:
            raise
        return None


def cmd_eval(args: argparse.Namespace) -> int:
    from calib.data import cut, read_text, tokenize
    from onnxq.core.sources import tokenizer_for
    from onnxq.core.steps import PARTS_SUFFIX
    from onnxq.device.generate import graphs
    from onnxq.evaluation import zeroshot
    from onnxq.evaluation.evaluate import pair_perplexity, perplexity

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    datasets = args.ppl if args.ppl is not None else ([] if tasks else ["wikitext2"])
    pairs = [m for m in args.model if Path(m).is_dir()]
    if pairs and tasks:
        raise OnnxqError(f"--tasks runs on scoring graphs; {pairs[0]} is a KV-cache folder", "pass --ppl for it")
    compiled = [m for m in pairs if graphs(m)[0].name.endswith(PARTS_SUFFIX)]
    if compiled and args.ep != "qnn":
        raise OnnxqError(f"{compiled[0]} is compiled for the HTP", "run it with --ep qnn")
    for task in tasks:
        if task not in zeroshot.TASKS:
            raise OnnxqError(f"unknown task {task!r}", f"use one of: {', '.join(zeroshot.TASKS)}")
    texts = {dataset: read_text(dataset) for dataset in datasets}  # read once, tokenized per model
    checked = []  # every model, its length and its tokenizer, before the first is scored
    for model in args.model:
        graph = str(graphs(model)[0]) if model in pairs else model  # a pair: its prefill graph names the rest
        checked.append((model, _model_seq_len(graph, args.seq_len), tokenizer_for(graph, args.tokenizer)))
    progress = _Progress(not (args.quiet or args.json))
    models = []
    try:
        for model, seq_len, tok in checked:
            entry: dict[str, Any] = {"model": model, "ep": args.ep, "results": [], "tasks": []}
            for dataset in datasets:
                w = cut(tokenize(tok, texts[dataset]), dataset, seq_len, args.windows)
                tick = progress(f"{dataset} ({args.ep})", len(w))
                score = pair_perplexity if model in pairs else perplexity
                r = score(model, w.ids, ep=args.ep, dataset=dataset, progress=tick)
                entry["results"].append(
                    {
                        "dataset": r.dataset,
                        "ppl": r.ppl,
                        "windows": r.windows,
                        "seq_len": r.seq_len,
                        "tokens": r.tokens,
                        "seconds": round(r.seconds, 1),
                    }
                )
            for task in tasks:
                tick = progress(f"{task} ({args.ep})", zeroshot.requests_count(task, args.limit))
                z = zeroshot.evaluate(
                    model, task, tok, limit=args.limit, ep=args.ep, progress=tick, pack=not args.no_pack
                )
                entry["tasks"].append(
                    {
                        "task": z.task,
                        "items": z.items,
                        "acc": z.acc,
                        "acc_norm": z.acc_norm,
                        "seconds": round(z.seconds, 1),
                    }
                )
            models.append(entry)
    finally:
        progress.close()
    data = {**models[0], "models": models}  # the first model's numbers also at the top level
    names = [Path(m["model"]).parent.name + "/" + Path(m["model"]).name for m in models]
    lines = [f"onnxq eval on {args.ep}: " + "  vs  ".join(names)]
    rows = []
    for i, dataset in enumerate(datasets):
        cells = [f"{m['results'][i]['ppl']:.3f}" for m in models]
        rows.append((f"{dataset} ppl", "  |  ".join(cells)))
    for i, task in enumerate(tasks):
        cells = [f"acc {m['tasks'][i]['acc']:.3f}, acc_norm {m['tasks'][i]['acc_norm']:.3f}" for m in models]
        rows.append((f"{task} ({models[0]['tasks'][i]['items']})", "  |  ".join(cells)))
    lines += _rows(rows)
    _emit(args, data, lines)
    return 0


def _model_seq_len(model: str, given: int | None = None) -> int:
    """The window length of a language model's graph (``given``, else its own), after the checks that
    its file is one."""
    import onnx

    from onnxq.core import ir as oir
    from onnxq.core.steps import PARTS_SUFFIX, WINDOW, read_shape

    if model.endswith(PARTS_SUFFIX):  # a step graph compiled in parts: windows fill its cache
        return given or min(read_shape(Path(model))[1].slots, WINDOW)
    proto = oir.read_graph(model)
    if not proto.graph.input or proto.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.INT64:
        raise OnnxqError(
            f"{model} does not take token ids (int64) as its first input",
            "pass a language model written by `onnxq export` or `onnxq quantize`",
        )
    if given:
        return given
    dims = [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.input[0].type.tensor_type.shape.dim]
    meta = {p.key: p.value for p in proto.metadata_props}
    if "onnxq.kv_slots" in meta:  # a KV-cache step graph: windows fill its cache
        return min(int(meta["onnxq.kv_slots"]), WINDOW)
    if len(dims) == 2 and dims[1]:
        return int(dims[1])
    raise OnnxqError(f"{model} has no static sequence length", "pass --seq-len N")


def cmd_validate(args: argparse.Namespace) -> int:
    import numpy as np

    from calib.data import windows
    from onnxq.device.validation import validate, validate_pair

    model = args.model
    if args.overwrite and not args.context:
        raise OnnxqError("--overwrite replaces a --context folder, and none is given", "drop --overwrite")
    pair = Path(model).is_dir()
    if pair:  # a KV-cache folder: two chunks of prefill per window, the last tokens through decode
        from onnxq.core.steps import PARTS_SUFFIX, read_shape
        from onnxq.device.generate import graphs

        if args.context:
            raise OnnxqError("--context takes a single graph", "write the pair's context binaries with `onnxq compile`")
        graph = str(graphs(model)[0])
        if graph.endswith(PARTS_SUFFIX):
            raise OnnxqError(
                f"{model} is compiled; validate compares a QDQ pair on the HTP with ONNX Runtime CPU",
                "validate the quantized folder, or run this one with `onnxq eval FOLDER --ep qnn`",
            )
        chunk, shape, _ = read_shape(Path(graph))
        seq_len = min(2 * chunk, shape.slots)
    else:
        graph = model
        seq_len = _model_seq_len(model)
    tok = _tokenizer_or_none(graph, args.tokenizer)
    if tok is not None:
        ids = windows(tok, args.data, seq_len, args.windows).ids
        source = f"{args.data}, first {args.windows} windows of {seq_len} tokens"
    else:
        vocab = _vocab_size(graph)
        ids = np.random.default_rng(0).integers(0, vocab, size=(args.windows, seq_len))
        source = f"{args.windows} windows of {seq_len} random tokens (no tokenizer found)"
    target = {"htp_arch": None if args.soc_model else args.htp_arch, "soc_model": args.soc_model}
    if pair:
        report = validate_pair(model, ids, **target)
        source += ", the last 4 of each through decode"
    else:
        context = Path(args.context) if args.context else None
        report = validate(model, ids, **target, context_dir=context, overwrite=args.overwrite)
    data = dict(report.__dict__)
    data["tokens"] = source
    steps = f"{report.error_in_steps:.1f} output steps" if report.error_in_steps is not None else "n/a"
    lines = [f"onnxq validate: {model} on the QNN HTP backend (CPU fallback disabled)"]
    lines += _rows(
        [
            (
                "nodes",
                f"{report.nodes_on_qnn} of {report.nodes_total} on QNNExecutionProvider "
                f"({100 * report.share_on_qnn:.0f} %)",
            ),
            ("tokens", source),
            (
                "HTP vs CPU",
                f"max |Δlogits| {report.max_abs_error:.4g} = {steps}, mean {report.mean_abs_error:.3g}, "
                f"top-1 agreement {100 * report.top1_agreement:.1f} %",
            ),
            ("HTP time", f"{report.seconds_htp:.1f} s for {report.windows} windows"),
        ]
    )
    if report.context_model:
        lines += _rows(
            [
                (
                    "context",
                    f"{report.context_model} written, reloaded and run "
                    f"(max |Δ| vs first run {report.context_max_abs_error:.3g})",
                )
            ]
        )
    _emit(args, data, lines)
    return 0


def _vocab_size(model: str) -> int:
    from onnxq.core import ir as oir

    proto = oir.read_graph(model)
    for dim in reversed(proto.graph.output[0].type.tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            return int(dim.dim_value)
    return 32000


def cmd_diff(args: argparse.Namespace) -> int:
    import numpy as np

    from calib.data import windows
    from onnxq.core import ir as oir
    from onnxq.evaluation.diff import diff

    oir.read_graph(args.float_model)
    seq_len = _model_seq_len(args.qdq)
    tok = _tokenizer_or_none(args.qdq, args.tokenizer)
    if tok is not None:
        ids = windows(tok, args.data, seq_len, args.windows).ids
    else:
        ids = np.random.default_rng(0).integers(0, _vocab_size(args.qdq), size=(args.windows, seq_len))
    report = diff(args.float_model, args.qdq, ids, ep=args.ep)
    rows = report.layers()
    data = {
        "layers": rows,
        "first_jump": report.first_jump,
        "most_clipped": report.most_clipped,
        "notes": report.notes,
        "ep": report.ep,
        "windows": report.windows,
    }
    kinds = ["attn_in", "q", "k", "v", "attn_out", "o_out", "resid_attn", "mlp_in", "down_in", "down_out", "resid_mlp"]
    lines = [f"onnxq diff: {args.qdq} against {args.float_model} ({report.windows} windows, SQNR in dB)"]
    header = (
        "layer " + " ".join(f"{k:>10}" for k in kinds) + "  local_err" + ("  htp_steps" if args.ep == "qnn" else "")
    )
    lines.append(header)
    for row in rows:
        if row["layer"] is None:
            continue
        cells = " ".join(f"{row.get(k, math.nan):>10.1f}" for k in kinds)
        line = f"{row['layer']:>5} {cells}  {row.get('local_rel_error', math.nan):>9.4f}"
        if args.ep == "qnn":
            line += f"  {row.get('htp_steps', math.nan):>9.0f}"
        lines.append(line)
    final = next((r for r in rows if r["layer"] is None), {})
    lines.append(
        f"final: head_in {final.get('head_in', math.nan):.1f} dB, logits {final.get('logits', math.nan):.1f} dB"
    )
    if report.first_jump:
        j = report.first_jump
        lines.append(
            f"first jump: layer {j['layer']} adds {j['local_rel_error']:.3g} relative error on its own "
            f"(typical layer {j['typical']:.3g})"
        )
    else:
        lines.append("first jump: none (every layer adds a similar error)")
    for c in report.most_clipped:
        lines.append(
            f"clips most: layer {c['layer']} {c['kind']} ({c['tensor']}): {100 * c['clipped']:.3f} % of values"
        )
    if report.ops:
        data["htp_ops"] = [asdict(o) for o in report.ops]
        lines.append("HTP against the reference fed the HTP's own inputs, op by op (first window; worst first):")
        for o in report.ops[:8]:
            lines.append(
                f"  {o.op:<12} {o.node}: {100 * o.mismatched:.1f} % of codes differ, "
                f"max {o.max_steps}, mean {o.mean_steps:.2f} ({o.bits}-bit steps)"
            )
    lines += [f"note: {n}" for n in report.notes]
    _emit(args, data, lines)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from onnxq.core import ir as oir
    from onnxq.device.check import run_checks

    model = oir.load(args.model)
    findings = run_checks(model, Path(args.encodings) if args.encodings else None)
    data = {"model": args.model, "findings": [f.__dict__ for f in findings]}
    lines = [f.line() for f in findings] or [f"onnxq check: {args.model}: no findings"]
    _emit(args, data, lines)
    return 1 if findings else 0


def cmd_compile(args: argparse.Namespace) -> int:
    from onnxq.device.compile import compile_model

    model = Path(args.model)
    output = Path(args.output) if args.output else model.parent / "htp"
    result = compile_model(
        model,
        output,
        toolchain=args.toolchain,
        htp_arch=args.htp_arch,
        soc_model=args.soc_model,
        encodings_version=args.encodings_version,
        overwrite=args.overwrite,
        progress=_stages(args),
        max_part_mb=args.max_part_mb,
        parts=args.parts,
    )
    target = f"SoC {args.soc_model}" if args.soc_model else f"HTP v{args.htp_arch}"
    lines = [f"onnxq compile: {model} -> {output}/  ({result.toolchain}, {target})"]
    rows = [("files", ", ".join(f"{n} ({_mb(output / n)})" for n in result.files))]
    rows.append(("time", ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())))
    if result.rerun_max_abs_error is not None:
        rows.append(
            ("reload", f"context reloaded and run once; max |Δlogits| vs compile {result.rerun_max_abs_error:.3g}")
        )
    for cmd in result.commands:
        rows.append(("ran", " ".join([Path(cmd[0]).name, *cmd[1:]])))
    lines += _rows(rows)
    _emit(args, result.as_dict(), lines)
    return 0


def _export_kv(args: argparse.Namespace) -> int:
    from onnxq.stages.export_kv import export_kv

    result = export_kv(
        args.model,
        args.output,
        chunk=args.chunk,
        context=args.context,
        mask_value=args.mask_value,
        seq_len=args.seq_len,
        overwrite=args.overwrite,
        progress=_stages(args),
    )
    data = {
        "output": str(result.folder),
        "files": [str(f) for f in result.files],
        "chunk": result.chunk,
        "context": result.slots,
        "max_abs_diff_vs_transformers": result.max_abs_diff,
        "seconds": round(result.seconds, 1),
    }
    lines = [f"onnxq export: {args.model or 'SmolLM2-135M-Instruct (default)'} -> {result.folder}/ (KV cache)"]
    lines += _rows(
        [
            ("graphs", f"prefill: {result.chunk} tokens, decode: 1 token; KV cache of {result.slots} positions"),
            ("scoring graph", f"model.onnx, {args.seq_len} tokens: what quantize calibrates, the pair follows it"),
            ("exactness", f"max |onnx - transformers| = {result.max_abs_diff:.2g} (all three graphs, float32)"),
            ("files", ", ".join(f"{f.name} ({_mb(f)})" for f in result.files)),
            ("time", f"{result.seconds:.0f} s"),
        ]
    )
    _emit(args, data, lines)
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from onnxq.device.genai import package

    result = package(args.folder, args.output, overwrite=args.overwrite)
    form = "compiled for the HTP (QNN EP)" if result.compiled else "ONNX Runtime CPU or QNN EP"
    lines = [f"onnxq package: {args.folder} -> {result.output}/  (onnxruntime-genai, {form})"]
    rows = [("files", ", ".join(f"{n} ({_mb(result.output / n)})" for n in result.files))]
    if result.loaded_by:
        rows.append(("check", f"loaded by onnxruntime-genai {result.loaded_by}"))
    else:
        rows.append(("check", "not loaded: onnxruntime-genai is not installed (pip install 'onnxq[genai]')"))
    lines += _rows(rows)
    _emit(args, result.as_dict(), lines)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from onnxq.device import genai
    from onnxq.device.generate import generate

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise OnnxqError(f"--temperature {args.temperature} is not 0 or more", "pass 0 (greedy) or e.g. 0.7")
    for flag, value in (("--top-k", args.top_k), ("--seed", args.seed)):
        if value < 0:
            raise OnnxqError(f"{flag} {value} is negative", f"pass {flag} 0 or more")
    run = genai.generate if (Path(args.folder) / genai.CONFIG).exists() else generate  # packaged: genai's loop
    stream = not (args.json or args.quiet)
    shown = []

    def show(text: str) -> None:  # the prompt goes out with the first token, after every check passed
        if not shown:
            print(args.prompt, end="", flush=True)
            shown.append(True)
        print(text, end="", flush=True)

    result = run(
        args.folder,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        ep=args.ep,
        on_token=show if stream else None,
    )
    data = {
        "prompt": args.prompt,
        "text": result.text,
        "tokens": len(result.tokens),
        "prefill_tokens_per_s": round(result.prefill_tps, 2),
        "decode_tokens_per_s": round(result.decode_tps, 2),
        "ep": args.ep,
    }
    if args.json:
        print(json.dumps(data, indent=1), file=args.json_out)
    elif not args.quiet:
        print(
            f"\n\n[{args.ep}] prefill {result.prompt_tokens} tokens at {result.prefill_tps:.1f} tok/s, "
            f"decode {len(result.tokens)} tokens at {result.decode_tps:.1f} tok/s",
            file=sys.stderr,
        )
    else:
        print(result.text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    result = _report(folder, args.model, args.data, args.tokenizer, quiet=args.quiet or args.json)
    data = {
        "html": str(result.html),
        "figures": {k: str(v) for k, v in result.figures.items()},
        "skipped": result.skipped,
    }
    lines = [f"onnxq report: {result.html} ({len(result.figures)} figures)"]
    lines += _rows(
        [(k, str(v)) for k, v in result.figures.items()] + [(k, f"not drawn: {v}") for k, v in result.skipped.items()]
    )
    _emit(args, data, lines)
    return 0


def _report(folder: Path, model: str | None, data: str, tokenizer: str | None, *, quiet: bool) -> Any:
    """The report of ``folder``, with one window of ``data`` for the float-vs-quantized figures."""
    from calib.data import windows
    from onnxq.core.sources import tokenizer_for
    from onnxq.evaluation.report import report

    summary_file = folder / "summary.json"
    if not summary_file.exists():
        raise OnnxqError(f"{folder} has no summary.json", "pass the folder `onnxq quantize` wrote")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    source = Path(model or summary.get("input", ""))
    ids = None
    if source.is_file() and (folder / "model.qdq.onnx").exists():
        ids = windows(tokenizer_for(folder / "model.qdq.onnx", tokenizer), data, int(summary["seq_len"]), 1).ids
    step = None if quiet else (lambda name: print(f"  report: {name}", file=sys.stderr, flush=True))
    return report(folder, float_model=source if source.is_file() else None, windows=ids, progress=step)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from onnxq.core.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="onnxq",
        description="Fully static, integer-only quantization of ONNX language models for Qualcomm's HTP NPU.",
        epilog=_examples([lines[0] for lines in EXAMPLES.values()]),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs; the result still prints")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "export",
        parents=[common],
        help="export a Hugging Face causal LM to static ONNX",
        description="Export MODEL (Hub id, local folder, .gguf file; default: the embedded "
        "SmolLM2-135M-Instruct) to a static-shape scoring graph: input_ids [1, S] -> logits.",
    )
    p.add_argument("model", nargs="?", help="Hub id, HF folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path; tokenizer files go next to it")
    p.add_argument("--seq-len", type=int, default=512, help="static sequence length S (default 512)")
    p.add_argument(
        "--mask-value",
        type=float,
        default=-100.0,
        help="additive causal-mask value (default -100; finite so the Softmax input quantizes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g = p.add_argument_group("generation graphs (-o is then a folder)")
    g.add_argument(
        "--kv-cache",
        action="store_true",
        help="write prefill.onnx and decode.onnx with a static KV cache as I/O, and the scoring graph model.onnx "
        "(--seq-len) that quantize calibrates",
    )
    g.add_argument("--chunk", type=int, default=64, help="tokens per prefill step (default 64)")
    g.add_argument("--context", type=int, default=512, help="KV cache positions (default 512)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a float ONNX model to static QDQ",
        description="Insert QuantizeLinear/DequantizeLinear with fixed scales, following the HTP's "
        "rules. Writes model.qdq.onnx, precision_map.json, encodings.json, recipe.toml, summary.json.",
    )
    p.add_argument("model", help="float ONNX model (onnxq export, optimum, torch.onnx), or an export --kv-cache folder")
    p.add_argument("-o", "--output", help="output folder (default: <model>-<preset> next to the model)")
    p.add_argument(
        "--preset",
        default="w8a16",
        help=f"weight/activation bits: {', '.join(PRESETS)} (default w8a16); "
        "a8 keeps norms, residual and softmax at 16 bits",
    )
    p.add_argument("--calib", default="c4", help="calibration text: c4, wikitext2-valid, or a .txt/.jsonl path")
    p.add_argument(
        "--windows",
        type=int,
        help="calibration windows of the sequence length (default: 64 when GPTQ rounds the weights, "
        "as for 4-bit presets, 16 otherwise)",
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "minmax", "percentile", "mse"],
        help="activation range estimator (auto: minmax at 16 bits, mse below)",
    )
    p.add_argument(
        "--weight-method",
        default="auto",
        choices=["auto", "mse", "minmax", "gptq"],
        help="weights: mse (clip search, round to nearest), minmax, gptq (mse scales, GPTQ rounding); "
        "auto (default): gptq, except mse for w8a16",
    )
    p.add_argument(
        "--rotate",
        default="hadamard",
        choices=["hadamard", "learned", "random", "none"],
        help="rotations merged into the weights: R1 (residual) and R2 (per head); default hadamard; "
        "learned: Hadamard, then R1 learned on top against the stream linears' quantization error (~1 min)",
    )
    p.add_argument(
        "--online-hadamard",
        metavar="r3,r4",
        help="run-time rotations to insert: r4 before down_proj, r3 on Q/K (constant MatMuls), none; "
        "default: the model family's for every preset but w8a16 (Llama: r4)",
    )
    p.add_argument(
        "--split-outliers",
        type=float,
        metavar="RATIO",
        help="8-bit presets: carry the down_proj input channels whose peak exceeds RATIO x the median "
        "channel's (at most 8 per layer) in a 16-bit side MatMul (default: the model family's recipe, "
        "16 for Llama-family models; 0: no split)",
    )
    p.add_argument(
        "--weight-block",
        type=int,
        metavar="N",
        help="4-bit weights: one scale per block of N input rows, in Qualcomm's LPBQ form (a power of "
        "two >= 16; 0: per output channel). Default: the model family's recipe",
    )
    p.add_argument(
        "--gptq-sweeps",
        type=int,
        metavar="N",
        help="GPTQ on 4-bit weights: N coordinate-descent sweeps after it, each re-rounding every input row "
        "against the layer-output error the others leave (default 3; 0: plain GPTQ)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random sign flips / matrices (default 0)")
    p.add_argument("--precision-map", help="precision_map.json to apply (edited from a previous run)")
    p.add_argument(
        "--encodings-version",
        default="1.0.0",
        choices=["1.0.0", "0.6.1"],
        help="AIMET format of model.encodings, for QAIRT's --quantization_overrides (default 1.0.0)",
    )
    g = p.add_argument_group("mixed precision (sensitivity-guided: 8-bit MatMul inputs to 16 bits, 4-bit weights to 8)")
    g.add_argument("--budget", type=float, help="fraction of 8-bit MatMul inputs to promote, e.g. 0.1 (default: none)")
    g.add_argument(
        "--weight-budget", type=float, help="fraction of 4-bit weights to promote to 8 bits, e.g. 0.1 (default: none)"
    )
    g.add_argument(
        "--budget-by",
        default="count",
        choices=["count", "macs"],
        help="budget unit: tensors, or MACs (weights: parameters) (default count)",
    )
    g.add_argument(
        "--selector",
        default="fisher",
        choices=["fisher", "measured", "relative", "random"],
        help="how candidates are ranked (default fisher: gradient-weighted quantization error)",
    )
    g.add_argument("--sensitivity-windows", type=int, default=4, help="windows scored for sensitivity (default 4)")
    g = p.add_argument_group("learning (end to end on the rounded model; layer by layer before it with --steps)")
    g.add_argument(
        "--learn", action="store_true", help="learn each weight's step against the float model's outputs (codes held)"
    )
    g.add_argument(
        "--steps",
        type=int,
        default=LearnConfig.steps,
        help="layer-wise steps per decoder layer, 0: none (default %(default)s)",
    )
    g.add_argument("--lr", type=float, default=LearnConfig.lr, help="layer-wise learning rate (default %(default)s)")
    g.add_argument(
        "--samples",
        type=int,
        help=f"calibration windows learned on (default {LEARN_SAMPLES}, fewer where --windows leaves fewer)",
    )
    g.add_argument("--no-learn-rotation", action="store_true", help="keep the Hadamard R2 fixed")
    g.add_argument(
        "--e2e-steps",
        type=int,
        default=LearnConfig.e2e_steps,
        help="end-to-end steps (windows), 0: none (default %(default)s)",
    )
    g.add_argument(
        "--e2e-lr", type=float, default=LearnConfig.e2e_lr, help="end-to-end learning rate (default %(default)s)"
    )
    g.add_argument(
        "--e2e-groups",
        default=",".join(LearnConfig.e2e_groups),
        help=f"what end-to-end learning trains, of: {', '.join(E2E_GROUPS)} (default %(default)s)",
    )
    g.add_argument(
        "--holdout",
        type=int,
        default=LearnConfig.holdout,
        help="last calibration windows held out: learning is kept only if better there (default %(default)s)",
    )
    g.add_argument("--device", default="cpu", help="torch device for learning: cpu or cuda (default cpu)")
    p.add_argument("--seq-len", type=int, help="fix the sequence length of a dynamic-shape model")
    p.add_argument("--mask-value", type=float, help="replace -inf/-3.4e38 masks with this value")
    p.add_argument("--tokenizer", help="tokenizer (Hub id/folder/.gguf) if none sits next to the model")
    p.add_argument(
        "--recipe",
        metavar="FILE",
        help="replay a run: the recipe.toml it wrote sets every option (same inputs and versions: same bytes)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-report", action="store_true", help="skip report.html and its figures (onnxq report)")
    p.add_argument(
        "--eval-windows",
        type=int,
        default=4,
        help="WikiText-2 windows for the float-vs-quantized perplexity in the summary (default 4; 0 skips)",
    )
    p.set_defaults(func=cmd_quantize, parser=p)

    p = sub.add_parser(
        "eval",
        parents=[common],
        help="perplexity and zero-shot accuracy on ONNX Runtime CPU or the QNN HTP",
        description="Perplexity over non-overlapping windows (as published results count it) and "
        "zero-shot accuracy (PIQA, HellaSwag; scored as lm-eval-harness does) of one or more models, side by side. "
        "A KV-cache folder is scored as deployed: each window streamed through its prefill graph chunk by chunk, "
        "with its quantized cache (windows of 512 tokens, or the whole cache if it is shorter).",
    )
    p.add_argument(
        "model", nargs="+", help="ONNX models (float or QDQ) or KV-cache folders, e.g. the float one and its QDQ"
    )
    p.add_argument("--ppl", nargs="+", help="datasets: wikitext2, c4, or text files (default wikitext2 unless --tasks)")
    p.add_argument("--tasks", help="zero-shot tasks, comma-separated: piqa, hellaswag")
    p.add_argument("--limit", type=int, help="first N items of each task (default all)")
    p.add_argument(
        "--no-pack",
        action="store_true",
        help="one request per window (slow reference path; by default CPU packs several per window)",
    )
    p.add_argument("--windows", type=int, default=40, help="number of windows (default 40)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's)")
    p.add_argument("--ep", default="cpu", choices=["cpu", "qnn"], help="execution provider (default cpu)")
    p.add_argument("--tokenizer", help="tokenizer if none sits next to the model")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "validate",
        parents=[common],
        help="run on the QNN HTP backend and compare with CPU",
        description="Run the QDQ model on the QNN EP's HTP backend with CPU fallback disabled, "
        "compare logits with ONNX Runtime CPU, optionally write the HTP context binary. A quantized KV-cache "
        "folder runs as a generator runs it: prefill in chunks, then decode token by token.",
    )
    p.add_argument("model", help="QDQ ONNX model, or a quantized KV-cache folder")
    p.add_argument("--windows", type=int, default=2, help="windows to compare (default 2)")
    p.add_argument("--data", default="wikitext2", help="text for the windows (default wikitext2)")
    p.add_argument("--context", help="a new folder for the EPContext model and HTP context binary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --context folder")
    p.add_argument("--htp-arch", default="75", help="HTP architecture (default 75)")
    p.add_argument("--soc-model", help="Snapdragon SoC model id (instead of --htp-arch)")
    p.add_argument("--tokenizer", help="tokenizer if none sits next to the model")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "compile",
        parents=[common],
        help="compile a QDQ model into an HTP context binary",
        description="Compile MODEL for the HTP. --toolchain ort (default): the QNN EP writes model_ctx.onnx + "
        "model_ctx_qnn.bin, reloaded and run once. --toolchain qairt: float model + AIMET encodings through "
        "qnn-onnx-converter, qnn-model-lib-generator and qnn-context-binary-generator "
        "(needs QAIRT_SDK_ROOT or QNN_SDK_ROOT).",
    )
    p.add_argument("model", help="QDQ ONNX model (model.qdq.onnx), or a quantized KV-cache folder (both graphs)")
    p.add_argument("-o", "--output", help="output folder (default: htp/ next to the model)")
    p.add_argument("--toolchain", default="ort", choices=["ort", "qairt"], help="who compiles (default ort)")
    p.add_argument("--htp-arch", default="75", help="HTP architecture (default 75)")
    p.add_argument("--soc-model", help="Snapdragon SoC model id (instead of --htp-arch)")
    p.add_argument(
        "--encodings-version", default="1.0.0", choices=["1.0.0", "0.6.1"], help="AIMET format (qairt; default 1.0.0)"
    )
    p.add_argument(
        "--max-part-mb",
        type=int,
        default=1800,
        help="a graph whose weights exceed this is compiled in parts at decoder-layer boundaries, each its own "
        "context (default 1800: the HTP allocates a context in pieces of under about 2 GB)",
    )
    p.add_argument("--parts", type=int, help="compile each graph in this many parts instead")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "package",
        parents=[common],
        help="a folder that onnxruntime-genai loads, from a KV-cache pair",
        description="Write OUTPUT: the prefill/decode pair of FOLDER (quantized by `onnxq quantize`, compiled by "
        "`onnxq compile`, or float) wrapped for onnxruntime-genai's decoder pipeline, its genai_config.json and "
        "the tokenizer. A compiled folder runs on the QNN EP. If onnxruntime-genai is installed, it loads the "
        "result before it is written.",
    )
    p.add_argument("folder", help="a KV-cache folder: prefill/decode graphs and the tokenizer")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate text with prefill/decode graphs",
        description="Greedy (default) or sampled generation with the prefill.onnx and decode.onnx in FOLDER "
        "(from `onnxq export --kv-cache`), streaming tokens; reports prefill and decode tokens/s. A folder "
        "from `onnxq package` runs in onnxruntime-genai's own generation loop.",
    )
    p.add_argument("folder", help="folder with prefill.onnx, decode.onnx and the tokenizer, or from onnxq package")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely (default 40)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--ep", default="cpu", choices=["cpu", "qnn"], help="ONNX Runtime CPU or the QNN HTP backend")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "report",
        parents=[common],
        help="an HTML report (and PNGs) of a quantized model",
        description="Write FOLDER/report.html (self-contained) and FOLDER/report/*.png: activation distributions "
        "without and with rotation, quantization ranges, the precision map, sensitivity, learning, per-layer error "
        "against float, and the benchmark of this checkout.",
    )
    p.add_argument("folder", help="output folder of onnxq quantize")
    p.add_argument("--model", help="the float model (default: the one summary.json names)")
    p.add_argument("--data", default="wikitext2", help="text for the one window the figures run (default wikitext2)")
    p.add_argument("--tokenizer", help="tokenizer if none sits next to the model")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "check",
        parents=[common],
        help="static checks of a QDQ model before the device",
        description="One line per finding, naming the tensor and the fix. Exit code 0: clean, 1: findings.",
    )
    p.add_argument("model", help="QDQ ONNX model")
    p.add_argument("--encodings", help="encodings file to check against the graph (onnxq or AIMET JSON)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "diff",
        parents=[common],
        help="per-layer error: float vs QDQ on CPU (and on the HTP)",
        description="Run the float model, the QDQ model on ONNX Runtime CPU and, with --ep qnn, on the QNN HTP "
        "backend on the same tokens; print SQNR per layer and point, the layer where the error jumps, and the "
        "tensors that clip most.",
    )
    p.add_argument("float_model", help="the float ONNX model the QDQ model was made from")
    p.add_argument("qdq", help="QDQ ONNX model")
    p.add_argument("--ep", default="cpu", choices=["cpu", "qnn"], help="also run on the HTP with --ep qnn")
    p.add_argument("--windows", type=int, default=1, help="windows of text (default 1)")
    p.add_argument("--data", default="wikitext2", help="text for the windows (default wikitext2)")
    p.add_argument("--tokenizer", help="tokenizer if none sits next to the QDQ model")
    p.set_defaults(func=cmd_diff)
    for name, command in sub.choices.items():
        command.epilog, command.formatter_class = _examples(EXAMPLES[name]), _Formatter
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnxq").setLevel(level if verbose else logging.WARNING)
    for name in ("rewrites", "calib"):
        logging.getLogger(name).setLevel(level if verbose else logging.WARNING)
    for noisy in ("onnxscript", "onnx_ir", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR if verbose < 2 else logging.DEBUG)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if verbose < 2:
        warnings.filterwarnings("ignore")


#: counts that must be at least 1 (``--eval-windows`` may be 0: it means "skip")
COUNTS = ("windows", "limit", "max_new_tokens", "samples", "seq_len", "chunk", "context", "parts", "max_part_mb")


@contextlib.contextmanager
def _json_stdout(args: argparse.Namespace) -> Iterator[None]:
    """With ``--json``, stdout carries the JSON alone: whatever else reaches file descriptor 1 (native
    libraries such as QNN's print there) goes to stderr while the command runs."""
    args.json_out = sys.stdout
    if not getattr(args, "json", False) or not _is_fd1(sys.stdout):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    args.json_out = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        args.json_out.close()


def _is_fd1(stream: Any) -> bool:
    """Whether ``stream`` writes to file descriptor 1 (not a capture object)."""
    try:
        return int(stream.fileno()) == 1
    except (AttributeError, OSError, ValueError):
        return False


def _require_build_extra(command: str) -> None:
    """Refuse a building command on a laptop install in one line, before any import fails deep inside."""
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxqError(
            f"`onnxq {command}` needs {' and '.join(missing)}, which the base (laptop) install leaves out",
            "pip install 'onnxq[quantize]' on the machine that builds the model",
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    start = time.perf_counter()
    try:
        if args.command in BUILDS:
            _require_build_extra(args.command)
        for name in COUNTS:
            value = getattr(args, name, None)
            if isinstance(value, int) and value < 1:  # validate's --context is a folder
                flag = "--" + name.replace("_", "-")
                raise OnnxqError(f"{flag} {value} is not a positive count", f"pass {flag} 1 or more")
        with _json_stdout(args):
            code = int(args.func(args))
    except OnnxqError as exc:
        print(f"onnxq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"onnxq {args.command}: interrupted", file=sys.stderr)
        return 130
    log.debug("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())

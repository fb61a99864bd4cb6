"""Benchmark onnxq against ONNX Runtime's static quantizer on SmolLM2-135M, in one run.

Every row uses the same exported graph, the same calibration windows (C4, first N of 512 tokens)
and the same evaluation windows (WikiText-2 test, first 40 of 512 tokens). Each quantization runs
in its own process so that its wall time and peak RSS are its own. Results go to
``tools/results/bench.json`` and the table in ``BENCHMARKS.md``.

    python tools/bench.py                      # every row (many hours on 2 cores)
    python tools/bench.py --rows fp32,onnxq-w8a16 --eval-windows 8   # a quick look
    python tools/bench.py --rows onnxq-w8a8-defaults --reuse --tasks piqa,hellaswag   # zero-shot, same model
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.options import E2E_GROUPS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results" / "bench.json"
TABLE = ROOT / "BENCHMARKS.md"

#: row name -> (tool, preset, extra quantize options); ``learn`` holds LearnConfig fields
#: the options of the rows that split outlier channels, add R4 and round weights with GPTQ
SPLIT_R4_GPTQ: dict[str, Any] = {"weight_method": "gptq", "split_outliers": 16.0, "online_hadamard": ["r4"]}
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "fp32": ("float", "", {}),
    "ort-w8a16": ("ort", "w8a16", {}),
    "ort-w8a8": ("ort", "w8a8", {}),
    "ort-w4a16": ("ort", "w4a16", {}),
    "ort-w4a8": ("ort", "w4a8", {}),
    # the strongest set-up of ONNX Runtime's quantizer: onnxq's canonical graph, per-channel weights
    "ort-canonical-w8a16": ("ort", "w8a16", {"canonical": True}),
    "ort-canonical-w8a8": ("ort", "w8a8", {"canonical": True}),
    "ort-canonical-w4a16": ("ort", "w4a16", {"canonical": True}),
    "ort-canonical-w4a8": ("ort", "w4a8", {"canonical": True}),
    # Qualcomm AIMET's QuantSim on the same canonical graph, HTP v73 config: min/max and tf_enhanced
    "aimet-w8a16-minmax": ("aimet", "w8a16", {"scheme": "minmax"}),
    "aimet-w8a16-tf_enhanced": ("aimet", "w8a16", {"scheme": "tf_enhanced"}),
    "aimet-w8a8-minmax": ("aimet", "w8a8", {"scheme": "minmax"}),
    "aimet-w8a8-tf_enhanced": ("aimet", "w8a8", {"scheme": "tf_enhanced"}),
    "aimet-w4a16-minmax": ("aimet", "w4a16", {"scheme": "minmax"}),
    "aimet-w4a16-tf_enhanced": ("aimet", "w4a16", {"scheme": "tf_enhanced"}),
    # the ablation, Quant.npu style: min/max -> + rotation -> + aware init -> + learning (-> + learned R2)
    "onnxq-w4a8-minmax-norot": (
        "onnxq",
        "w4a8",
        {"rotate": "none", "method": "minmax", "weight_method": "minmax", "weight_block": 0},
    ),
    "onnxq-w4a8-minmax": ("onnxq", "w4a8", {"method": "minmax", "weight_method": "minmax", "weight_block": 0}),
    "onnxq-w4a8-aware": ("onnxq", "w4a8", {"weight_method": "minmax", "method": "aware", "weight_block": 0}),
    "onnxq-w4a8-norot": ("onnxq", "w4a8", {"weight_method": "mse", "rotate": "none", "weight_block": 0}),
    "onnxq-w4a8": ("onnxq", "w4a8", {"weight_method": "mse", "weight_block": 0}),
    "onnxq-w4a8-learn-fixedrot": (
        "onnxq",
        "w4a8",
        {"weight_method": "mse", "learn": {"learn_rotation": False}, "weight_block": 0},
    ),
    "onnxq-w4a8-learn": ("onnxq", "w4a8", {"weight_method": "mse", "learn": {}, "weight_block": 0}),
    "onnxq-w4a8-gptq": ("onnxq", "w4a8", {"weight_method": "gptq", "weight_block": 0, "gptq_sweeps": 0}),
    # `onnxq quantize --preset w4a8 --learn`, all else default (outlier split, LPBQ 16, GPTQ + sweeps, 64 windows)
    "onnxq-w4a8-learn-defaults": ("onnxq", "w4a8", {"learn": {}, "split_outliers": 16.0, "windows": 64}),
    "onnxq-w4a8-learn-gptq": (
        "onnxq",
        "w4a8",
        {"weight_method": "gptq", "learn": {}, "weight_block": 0, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-r3r4": ("onnxq", "w4a8", {"weight_method": "mse", "online_hadamard": ["r3", "r4"], "weight_block": 0}),
    "onnxq-w8a16-norot": ("onnxq", "w8a16", {"weight_method": "mse", "rotate": "none"}),
    "onnxq-w8a16": ("onnxq", "w8a16", {"weight_method": "mse"}),
    "onnxq-w8a8-norot": ("onnxq", "w8a8", {"weight_method": "mse", "rotate": "none"}),
    "onnxq-w8a8": ("onnxq", "w8a8", {"weight_method": "mse"}),
    "onnxq-w8a8-learn": ("onnxq", "w8a8", {"weight_method": "mse", "learn": {}}),
    # massive-activation channels of the MLP on a 16-bit side path (--split-outliers), and the
    # run-time Hadamard R4 at 16 bits in front of down_proj's 8-bit input
    "onnxq-w8a8-split": ("onnxq", "w8a8", {"weight_method": "mse", "split_outliers": 16.0}),
    "onnxq-w8a8-r4": ("onnxq", "w8a8", {"weight_method": "mse", "online_hadamard": ["r4"]}),
    "onnxq-w8a8-split-r4": (
        "onnxq",
        "w8a8",
        {"weight_method": "mse", "split_outliers": 16.0, "online_hadamard": ["r4"]},
    ),
    "onnxq-w8a8-split-r4-gptq": (
        "onnxq",
        "w8a8",
        dict(SPLIT_R4_GPTQ),
    ),
    "onnxq-w8a8-split-r4-learn": (
        "onnxq",
        "w8a8",
        {"weight_method": "mse", "split_outliers": 16.0, "online_hadamard": ["r4"], "learn": {}},
    ),
    "onnxq-w4a8-split-r4": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 0, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-split-r4-learn": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "learn": {}, "weight_block": 0, "gptq_sweeps": 0},
    ),
    # 4-bit weights per block of input rows (LPBQ; the recipe's default is 16), then more
    # calibration windows for GPTQ's Hessians
    "onnxq-w4a8-split-r4-lpbq": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 32, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-split-r4-lpbq-w64": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 32, "gptq_sweeps": 0, "windows": 64},
    ),
    "onnxq-w4a8-split-r4-lpbq16-w64": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 16, "gptq_sweeps": 0, "windows": 64},
    ),
    "onnxq-w4a8-split-r4-lpbq16-w128": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 16, "gptq_sweeps": 0, "windows": 128},
    ),
    # GPTQ, then coordinate-descent sweeps over its rounding (the default since they landed)
    "onnxq-w4a8-split-r4-lpbq16-w64-sweeps": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 16, "gptq_sweeps": 3, "windows": 64},
    ),
    # the same with R1 learned on top of the Hadamard one (--rotate learned)
    "onnxq-w4a8-split-r4-lpbq16-w64-sweeps-r1": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 16, "gptq_sweeps": 3, "windows": 64, "rotate": "learned"},
    ),
    # the same with Quant.npu's mixed precision: 5 or 10 % of the 8-bit MatMul inputs promoted to 16 bits
    "onnxq-w4a8-split-r4-lpbq16-w64-sweeps-mp05": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 16, "gptq_sweeps": 3, "windows": 64, "budget": 0.05},
    ),
    "onnxq-w4a8-split-r4-lpbq16-w64-sweeps-mp10": (
        "onnxq",
        "w4a8",
        {**SPLIT_R4_GPTQ, "weight_block": 16, "gptq_sweeps": 3, "windows": 64, "budget": 0.1},
    ),
    "onnxq-w4a16-lpbq-w64": (
        "onnxq",
        "w4a16",
        {"weight_method": "gptq", "online_hadamard": ["r4"], "weight_block": 32, "gptq_sweeps": 0, "windows": 64},
    ),
    "onnxq-w4a16-lpbq16-w64-sweeps": (
        "onnxq",
        "w4a16",
        {"weight_method": "gptq", "online_hadamard": ["r4"], "weight_block": 16, "gptq_sweeps": 3, "windows": 64},
    ),
    "onnxq-w8a8-mp05-fisher": ("onnxq", "w8a8", {"budget": 0.05}),
    "onnxq-w8a8-mp10-fisher": ("onnxq", "w8a8", {"budget": 0.1}),
    "onnxq-w8a8-mp20-fisher": ("onnxq", "w8a8", {"budget": 0.2}),
    "onnxq-w4a16-norot": ("onnxq", "w4a16", {"weight_method": "mse", "rotate": "none", "weight_block": 0}),
    "onnxq-w4a16": ("onnxq", "w4a16", {"weight_method": "mse", "weight_block": 0}),
    "onnxq-w4a16-gptq": ("onnxq", "w4a16", {"weight_method": "gptq", "weight_block": 0, "gptq_sweeps": 0}),
    # mixed precision (issue: Pareto of W4A8 against the share of 8-bit MatMul inputs promoted to 16 bits)
    "onnxq-w4a8-mp05-fisher": ("onnxq", "w4a8", {"budget": 0.05, "weight_block": 0, "gptq_sweeps": 0}),
    "onnxq-w4a8-mp10-fisher": ("onnxq", "w4a8", {"budget": 0.1, "weight_block": 0, "gptq_sweeps": 0}),
    "onnxq-w4a8-mp20-fisher": ("onnxq", "w4a8", {"budget": 0.2, "weight_block": 0, "gptq_sweeps": 0}),
    "onnxq-w4a8-mp10-relative": (
        "onnxq",
        "w4a8",
        {"budget": 0.1, "selector": "relative", "weight_block": 0, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-mp10-random": (
        "onnxq",
        "w4a8",
        {"budget": 0.1, "selector": "random", "weight_block": 0, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-wb10-fisher": (
        "onnxq",
        "w4a8",
        {"weight_budget": 0.1, "budget_by": "macs", "weight_block": 0, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-wb10-relative": (
        "onnxq",
        "w4a8",
        {"weight_budget": 0.1, "budget_by": "macs", "selector": "relative", "weight_block": 0, "gptq_sweeps": 0},
    ),
    "onnxq-w4a8-wb10-random": (
        "onnxq",
        "w4a8",
        {"weight_budget": 0.1, "budget_by": "macs", "selector": "random", "weight_block": 0, "gptq_sweeps": 0},
    ),
}
#: `onnxq quantize --preset P` with no other option: each preset's defaults as they are today
PRESET_DEFAULTS = {f"onnxq-{p}-defaults": ("onnxq", p, {}) for p in ("w8a16", "w8a8", "w4a16", "w4a8")}
ROWS.update(PRESET_DEFAULTS)
#: `--learn` on the defaults (issue: learning that pays), and each end-to-end group alone on W4A8
LEARN_DEFAULTS = {
    "onnxq-w4a8-defaults-learn": ("onnxq", "w4a8", {"learn": {}}),
    "onnxq-w8a8-defaults-learn": ("onnxq", "w8a8", {"learn": {}}),
    **{
        f"onnxq-w4a8-defaults-learn-{group}": ("onnxq", "w4a8", {"learn": {"e2e_groups": [group]}})
        for group in ("ranges", "down_in", "side", "kv", "rounding")  # `scales` alone is the default
    },
}
ROWS.update(LEARN_DEFAULTS)
VALIDATE = ("onnxq-w8a16", "onnxq-w4a8-learn")  # 2 windows on the HTP emulator: ~15 min each


def _run(cmd: list[str]) -> dict[str, Any]:
    """Run a step in a fresh process (in the repository root) and parse the JSON it prints last."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_quantize_onnxq(
    model: Path, out: Path, preset: str, calib: str, windows: int | None, extra: dict, *, pinned: bool = True
) -> dict:
    """Quantize in a process of its own. ``pinned``: the row's options are what it was measured with,
    so a default that changed since (the a8 outlier split; R4 and GPTQ for all presets but w8a16) is
    held at its old value unless the row names it. Unpinned rows run the preset's defaults as they are."""
    extra = dict(extra)
    if pinned:
        extra.setdefault("split_outliers", 0.0)
        extra.setdefault("online_hadamard", [])
        extra.setdefault("weight_method", "mse" if preset == "w8a8" else "auto")
    learn = extra.pop("learn", None)
    if pinned and learn is not None:
        learn = {"steps": 30, "e2e_steps": 0, **learn}  # measured when --learn was the layer-wise stage alone
    windows = extra.pop("windows", windows if pinned else None)  # a row may calibrate on more windows
    code = (
        "import json, sys; from onnxq.stages.pipeline import quantize; from onnxq.core.options import LearnConfig; "
        f"r = quantize({str(model)!r}, {str(out)!r}, preset={preset!r}, calib={calib!r}, windows={windows}, "
        f"overwrite=True, learn=None if {learn!r} is None else LearnConfig(**{learn!r}), **{extra!r}); "
        "print(json.dumps({'seconds': r.summary['seconds'], 'peak_rss_mb': r.summary['peak_rss_mb'], "
        "'counts': r.summary['counts'], 'macs': r.summary.get('macs')}))"
    )
    return _run([sys.executable, "-c", code])


def step_eval(model: Path, windows_file: Path, ep: str = "cpu") -> dict:
    code = (
        "import json, numpy as np; from onnxq.evaluation.evaluate import perplexity; "
        "from onnxq.stages.metrics import peak_rss_mb; "
        f"r = perplexity({str(model)!r}, np.load({str(windows_file)!r}), ep={ep!r}); "
        "print(json.dumps({'ppl': r.ppl, 'nll': r.nll, 'seconds': round(r.seconds, 1), 'tokens': r.tokens, "
        "'peak_rss_mb': peak_rss_mb()}))"
    )
    return _run([sys.executable, "-c", code])


ZEROSHOT = """
import json, sys, time
import numpy as np

from onnxq.core.options import E2E_GROUPS
from onnxq.evaluation import zeroshot
from onnxq.stages.metrics import peak_rss_mb
from onnxq.core.sources import tokenizer_for
model, tasks, source = sys.argv[1], sys.argv[2].split(","), sys.argv[5]
limit, check = int(sys.argv[3]), int(sys.argv[4])
tok = tokenizer_for(source)  # the float model's folder: ONNX Runtime's quantizer writes no tokenizer beside its model
out = {}
for task in tasks:
    r = zeroshot.evaluate(model, task, tok, limit=limit)
    out[task] = {"items": r.items, "acc": r.acc, "acc_norm": r.acc_norm, "seconds": round(r.seconds, 1)}
    if check:
        u = zeroshot.evaluate(model, task, tok, limit=check, pack=False)
        d = np.abs(np.concatenate([np.subtract(a, b) for a, b in zip(r.loglik[:check], u.loglik)]))
        same = np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(r.loglik[:check], u.loglik)])
        gold = [item.gold for item in zeroshot.load(task, limit=check)]
        acc_packed = np.mean([np.argmax(a) == g for a, g in zip(r.loglik[:check], gold)])
        out[task]["unpacked"] = {"items": check, "acc": u.acc, "acc_norm": u.acc_norm, "seconds": round(u.seconds, 1),
                                 "max_abs_dlogp": float(d.max()), "mean_abs_dlogp": float(d.mean()),
                                 "same_choice": float(same), "acc_packed": float(acc_packed)}
out["peak_rss_mb"] = peak_rss_mb()
print(json.dumps(out))
"""


def step_zeroshot(model: Path, tasks: str, limit: int, check: int, source: Path) -> dict:
    """Zero-shot accuracy (packed windows); with ``check`` > 0 also the first ``check`` items one
    request per window, to measure what packing changes. ``source``: the float model (tokenizer)."""
    return _run([sys.executable, "-c", ZEROSHOT, str(model), tasks, str(limit), str(check), str(source)])


def step_validate(model: Path, windows_file: Path, context: Path) -> dict:
    code = (
        "import json, numpy as np; from pathlib import Path; from onnxq.device.validation import validate; "
        f"r = validate({str(model)!r}, np.load({str(windows_file)!r})[:2], "
        f"context_dir=Path({str(context)!r}), overwrite=True); "
        "print(json.dumps({k: v for k, v in r.__dict__.items() if k != 'extra'}))"
    )
    return _run([sys.executable, "-c", code])


def step_htp(model: Path, work: Path, windows: int) -> dict:
    """Perplexity on the HTP backend (CPU fallback disabled) and on ONNX Runtime CPU, same first windows."""
    part = work / f"eval-htp{windows}.npy"
    np.save(part, np.load(work / "eval.npy")[:windows])
    return {"windows": windows, "qnn": step_eval(model, part, "qnn"), "cpu": step_eval(model, part, "cpu")}


def step_compile(model: Path, out: Path) -> dict:
    code = (
        "import json; from onnxq.device.compile import compile_model; from onnxq.stages.metrics import peak_rss_mb; "
        f"r = compile_model({str(model)!r}, {str(out)!r}, overwrite=True, verify=False); "
        "d = r.as_dict(); d['peak_rss_mb'] = peak_rss_mb(); print(json.dumps(d))"
    )
    return _run([sys.executable, "-c", code])


def prepare_inputs(work: Path, model: Path | None, seq_len: int, calib_windows: int, eval_windows: int) -> dict:
    """Export the model (once) and write the token windows every row shares."""
    from calib.data import windows
    from onnxq.core.sources import tokenizer_for
    from onnxq.stages.export import export

    if model is None:
        model = work / "smollm2" / "model.onnx"
        if not model.exists():
            result = export(None, model, seq_len=seq_len, overwrite=True)
            export_info = {"seconds": round(result.seconds, 1), "max_abs_diff": result.max_abs_diff}
        else:
            export_info = {"reused": True}
    else:
        export_info = {"given": str(model)}
    tok = tokenizer_for(model)
    cal = windows(tok, "c4", seq_len, calib_windows)
    ev = windows(tok, "wikitext2", seq_len, eval_windows)
    np.save(work / "calib.npy", cal.ids)
    np.save(work / "eval.npy", ev.ids)
    return {"model": model, "export": export_info}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the wanted rows; rows already in the results file for the same setup are kept (``--fresh`` drops them).

    Results are written after every row, so an interrupted run keeps what it measured.
    """
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(
        work, Path(args.model) if args.model else None, args.seq_len, args.calib_windows, args.eval_windows
    )
    model: Path = inputs["model"]
    setup = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> float32)" if not args.model else str(args.model),
        "seq_len": args.seq_len,
        "calibration": {"data": "c4 (shared/data/c4/c4_validation_1k.jsonl)", "windows": args.calib_windows},
        "evaluation": {"data": "wikitext2 test (first windows)", "windows": args.eval_windows},
    }
    results: dict[str, Any] = {**setup, "rows": {}}
    if RESULTS.exists() and not args.fresh and not args.dry:
        old = json.loads(RESULTS.read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in setup.items()):
            results["rows"] = {k: v for k, v in old["rows"].items() if k in ROWS}
    wanted = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [n for n in wanted if n not in ROWS]
    if unknown:
        raise SystemExit(f"bench: unknown rows {unknown}; known: {', '.join(ROWS)}")
    compiled, on_htp = args.compile.split(","), args.htp_eval.split(",")
    if args.reuse and not args.rows:
        wanted = [n for n in ROWS if n in compiled or n in on_htp]
        if args.tasks and not wanted:
            raise SystemExit("bench: --reuse --tasks: name the rows with --rows")

    def zeroshot(name: str, target: Path) -> dict:
        check = args.pack_check_items if name in args.pack_check.split(",") else 0
        return step_zeroshot(target, args.tasks, args.task_limit, check, model)

    for name in wanted:
        tool, preset, extra = ROWS[name]
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if args.reuse:  # the row's model as the last run left it
            if name not in results["rows"]:
                raise SystemExit(f"bench: --reuse {name}: run the row first")
            target = model if tool == "float" else work / name / "model.qdq.onnx"
            if name in compiled:
                results["rows"][name]["compile"] = step_compile(target, work / name / "ctx")
            if name in on_htp:
                results["rows"][name]["htp"] = step_htp(target, work, args.htp_windows)
            if args.tasks:
                results["rows"][name]["zeroshot"] = zeroshot(name, target)
            _save(results, inputs, args)
            continue
        row: dict[str, Any] = {"tool": tool, "preset": preset, "options": extra, "date": time.strftime("%Y-%m-%d")}
        target = model
        if tool == "onnxq":
            out = work / name
            pinned = name not in PRESET_DEFAULTS and name not in LEARN_DEFAULTS
            row["quantize"] = step_quantize_onnxq(model, out, preset, "c4", args.calib_windows, extra, pinned=pinned)
            row["recipe"] = tomllib.loads((out / "recipe.toml").read_text(encoding="utf-8"))["options"]
            learned = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("learning") or {}
            if "end_to_end" in learned:  # the guard's verdict, without the loss of every step
                row["end_to_end"] = {k: v for k, v in learned["end_to_end"].items() if k != "loss"}
            target = out / "model.qdq.onnx"
        elif tool == "ort":
            target = work / name / "model.qdq.onnx"
            row["quantize"] = _run(
                [
                    sys.executable,
                    str(ROOT / "tools" / "ort_baseline.py"),
                    str(model),
                    str(target),
                    "--preset",
                    preset,
                    "--windows",
                    str(work / "calib.npy"),
                    *(["--canonical"] if extra.get("canonical") else []),
                ]
            )
        elif tool == "aimet":
            target = work / name / "model.qdq.onnx"
            scheme, calib_npy = extra["scheme"], str(work / "calib.npy")
            argv = [str(model), str(target), "--preset", preset, "--scheme", scheme, "--windows", calib_npy]
            row["quantize"] = _run([sys.executable, "-m", "tools.aimet_baseline", *argv])
        row["eval"] = step_eval(target, work / "eval.npy")
        if name in args.validate.split(",") and not args.no_validate:
            row["validate"] = step_validate(target, work / "eval.npy", work / name / "htp")
        if name in compiled:
            row["compile"] = step_compile(target, work / name / "ctx")
        if name in on_htp:
            row["htp"] = step_htp(target, work, args.htp_windows)
        earlier = results["rows"].get(name, {})
        for key in ("validate", "compile", "htp"):  # HTP runs are slow: keep an earlier one, dated, if not redone
            if key not in row and key in earlier:
                row[key] = {**earlier[key], "date": earlier[key].get("date", earlier["date"])}
        if args.tasks:
            row["zeroshot"] = zeroshot(name, target)
        results["rows"][name] = row
        print(f"[bench] {name}: ppl {row['eval']['ppl']:.3f}", file=sys.stderr, flush=True)
        _save(results, inputs, args)
    return results


def _save(results: dict[str, Any], inputs: dict[str, Any], args: argparse.Namespace) -> None:
    results.update(
        export=inputs["export"],
        machine={"cpus": _cpus(), "platform": platform.platform(), "python": platform.python_version()},
        date=time.strftime("%Y-%m-%d"),
    )
    results["rows"] = {k: results["rows"][k] for k in ROWS if k in results["rows"]}  # table order
    if not args.dry:
        write(results)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _describe(row: dict[str, Any]) -> tuple[str, str]:
    """(rotation, method) cells for a row."""
    if row["tool"] == "ort":
        if row.get("options", {}).get("canonical"):
            return "", "min/max, canonical graph (fused RMSNorm, finite mask), per-channel weights"
        return "", "min/max, graph as exported"
    if row["tool"] == "aimet":
        return "", f"AIMET {row['options']['scheme']}, canonical graph, htp_v73 config (per-channel weights)"
    if row["tool"] != "onnxq":
        return "", ""
    opts = row.get("options", {})
    if set(opts) <= {"learn"} and row.get("recipe"):  # a defaults row: what the run resolved, from its recipe.toml
        keys = ["rotate", "online_hadamard", "method", "weight_method", "split_outliers", "gptq_sweeps", "windows"]
        if row["preset"].startswith("w4"):  # the family's block applies to 4-bit weights only
            keys.append("weight_block")
        keys.append("learn")
        opts = {k: row["recipe"][k] for k in keys if k in row["recipe"]}
    rot = opts.get("rotate", "hadamard")
    rot = "hadamard + learned R1" if rot == "learned" else rot
    if opts.get("online_hadamard"):
        rot += " + online " + ",".join(opts["online_hadamard"])
    chosen = opts.get("method", "auto")
    method = {"aware": "aware init", "minmax": "min/max"}.get(chosen, chosen)
    method += ", weights " + opts.get("weight_method", "auto")
    if opts.get("split_outliers"):
        method += f", outlier channels split (ratio {opts['split_outliers']:g})"
    if opts.get("weight_block"):
        method += f", W4 per block of {opts['weight_block']} (LPBQ)"
    if opts.get("gptq_sweeps"):
        method += f" + {opts['gptq_sweeps']} sweeps"
    if "windows" in opts:
        method += f", {opts['windows']} calibration windows"
    if "budget" in opts:
        method += f", {100 * opts['budget']:.0f} % promoted to A16 ({opts.get('selector', 'fisher')})"
    if "weight_budget" in opts:
        unit = "params" if opts.get("budget_by") == "macs" else "tensors"
        method += f", {100 * opts['weight_budget']:.0f} % of weight {unit} to W8 ({opts.get('selector', 'fisher')})"
    if "learn" in opts:
        learn = opts["learn"]
        layerwise = learn.get("steps", 30) > 0 and learn.get("learn_rotation", True)
        if learn.get("steps", 30):  # rows from before --steps 0 always ran the layer-wise stage
            method += ", learned ranges + clipping" + (" + R2" if layerwise else "")
        if learn.get("e2e_steps", 0):  # and no end-to-end stage
            method += f", learned end to end ({', '.join(learn.get('e2e_groups', E2E_GROUPS))})"
        rot += " (learned)" if layerwise else ""
    return rot, method


#: the mixed-precision Pareto of W4A8 (GPTQ weights): share of 8-bit MatMul inputs promoted to 16 bits
PARETO = (
    ("0 %", "onnxq-w4a8-gptq", "onnxq-w8a8"),
    ("5 %", "onnxq-w4a8-mp05-fisher", "onnxq-w8a8-mp05-fisher"),
    ("10 %", "onnxq-w4a8-mp10-fisher", "onnxq-w8a8-mp10-fisher"),
    ("20 %", "onnxq-w4a8-mp20-fisher", "onnxq-w8a8-mp20-fisher"),
    ("all (W4A16 / W8A16)", "onnxq-w4a16-gptq", "onnxq-w8a16"),
)
SELECTORS = (
    ("A8 -> A16, 10 % of inputs", ("onnxq-w4a8-mp10-fisher", "onnxq-w4a8-mp10-relative", "onnxq-w4a8-mp10-random")),
    ("W4 -> W8, 10 % of weights", ("onnxq-w4a8-wb10-fisher", "onnxq-w4a8-wb10-relative", "onnxq-w4a8-wb10-random")),
)


#: Quant.npu's ablation on W4A8, one step at a time
ABLATION = (
    ("min/max, no rotation", "onnxq-w4a8-minmax-norot"),
    ("+ Hadamard rotation (R1, R2)", "onnxq-w4a8-minmax"),
    ("+ rotation-aware initialisation (mean ± kσ)", "onnxq-w4a8-aware"),
    ("+ MSE-optimal clipping instead (8-bit activations, weights)", "onnxq-w4a8"),
    ("+ two-stage learning (ranges, weight clipping)", "onnxq-w4a8-learn-fixedrot"),
    ("+ learned rotation (R2)", "onnxq-w4a8-learn"),
    ("MSE clipping + GPTQ rounding instead of learning", "onnxq-w4a8-gptq"),
    ("learning + GPTQ rounding", "onnxq-w4a8-learn-gptq"),
)


#: massive activations: what the 16-bit side path and the 16-bit R4 each bring at 8-bit activations
OUTLIERS = (
    ("W8A8, Hadamard R1+R2", "onnxq-w8a8"),
    ("+ outlier channels on a 16-bit side path", "onnxq-w8a8-split"),
    ("R4 alone (16-bit rotation, 8-bit down_proj input)", "onnxq-w8a8-r4"),
    ("+ outlier channels + R4", "onnxq-w8a8-split-r4"),
    ("+ outlier channels + R4, GPTQ weights", "onnxq-w8a8-split-r4-gptq"),
    ("+ outlier channels + R4, learning", "onnxq-w8a8-split-r4-learn"),
    ("W4A8, GPTQ weights", "onnxq-w4a8-gptq"),
    ("+ outlier channels + R4", "onnxq-w4a8-split-r4"),
    ("+ outlier channels + R4, learning + GPTQ", "onnxq-w4a8-split-r4-learn"),
    ("+ outlier channels + R4, W4 per block of 32 (LPBQ)", "onnxq-w4a8-split-r4-lpbq"),
    ("+ outlier channels + R4, LPBQ, 64 calibration windows", "onnxq-w4a8-split-r4-lpbq-w64"),
    ("+ outlier channels + R4, LPBQ blocks of 16, 64 calibration windows", "onnxq-w4a8-split-r4-lpbq16-w64"),
    ("+ outlier channels + R4, LPBQ blocks of 16, 128 calibration windows", "onnxq-w4a8-split-r4-lpbq16-w128"),
    (
        "+ outlier channels + R4, LPBQ blocks of 16, 64 windows, GPTQ + 3 sweeps",
        "onnxq-w4a8-split-r4-lpbq16-w64-sweeps",
    ),
    ("W4A16, R4, LPBQ, 64 calibration windows (the weights' share)", "onnxq-w4a16-lpbq-w64"),
    ("W4A16, R4, LPBQ blocks of 16, 64 windows, GPTQ + 3 sweeps (the weights' share)", "onnxq-w4a16-lpbq16-w64-sweeps"),
)


def _step_rows(rows: dict[str, Any], present: list[tuple[str, str]]) -> list[str]:
    """Table lines ``| step | row | PPL | x FP32 | time | peak RSS |`` for (label, row name) pairs."""
    fp = rows.get("fp32", {}).get("eval", {}).get("ppl")
    lines = []
    for label, name in present:
        q = rows[name].get("quantize", {})
        ppl = rows[name]["eval"]["ppl"]
        ratio = f"{ppl / fp:.3f}" if fp else ""
        lines.append(
            f"| {label} | {name} | {ppl:.2f} | {ratio} | {q.get('seconds', 0):.0f} s | "
            f"{q.get('peak_rss_mb', 0) / 1024:.2f} GB |"
        )
    return lines


def _step_section(title: str, prose: list[str], rows: dict[str, Any], present: list[tuple[str, str]]) -> str:
    """A titled section: prose, then the step table of ``present``."""
    lines = [
        title,
        "",
        *prose,
        "",
        "| step | row | WikiText-2 PPL | × FP32 | time | peak RSS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    return "\n".join(lines + _step_rows(rows, present)) + "\n"


def outliers(results: dict[str, Any]) -> str:
    """The massive-activation section: 8-bit activations with the side path and R4."""
    rows = results["rows"]
    present = [(label, name) for label, name in OUTLIERS if name in rows]
    if not any("split" in name for _, name in present):
        return ""
    prose = [
        "A few intermediate MLP channels carry values 100-1000x the rest at the first token (SmolLM2 layer 11:",
        "3069 in one of 1536 down_proj input channels, against ~16 elsewhere). `--split-outliers 16` moves the",
        "channels whose peak exceeds 16x the median channel's (19 channels in 8 layers here, chosen on 4",
        "calibration windows) to a 16-bit side path of three k-wide MatMuls (gate, up, down rows), exact in",
        "float; `--online-hadamard r4` rotates the 16-bit SwiGLU product before down_proj reads it at 8 bits",
        "(as two small MatMuls on a 12 x 128 view: H12 ⊗ H128). The last W4 rows put the 4-bit weights",
        "in blocks of 32 or 16 input rows (LPBQ: a float scale per output channel times a 4-bit integer",
        "per block, which the HTP runs on its per-channel kernels) and give GPTQ 64 calibration windows.",
    ]
    return _step_section("## Massive activations (8-bit activations)", prose, rows, present)


def ablation(results: dict[str, Any]) -> str:
    """Quant.npu-style ablation: what each step adds on W4A8."""
    rows = results["rows"]
    present = [(label, name) for label, name in ABLATION if name in rows]
    if len(present) < 3:
        return ""
    prose = [
        "Each step changes one thing (min/max rows: 4-bit weights by per-channel min/max too; the learning",
        "rows start from the MSE row). Learning acts on the rotated MatMul inputs and the weights; the",
        "down_proj inputs, where W4A8 loses most (see the per-layer diff below), are neither rotated nor learned.",
    ]
    return _step_section("## Ablation (W4A8)", prose, rows, present)


#: end-to-end learning: (what is learned, row, the same recipe without --learn)
LEARNING = (
    ("W4A8: weight steps per output channel, codes held (`scales`, the default)", "onnxq-w4a8-defaults-learn"),
    ("W4A8: MatMul and attention input ranges (`ranges`)", "onnxq-w4a8-defaults-learn-ranges"),
    ("W4A8: down_proj input ranges after R4 (`down_in`)", "onnxq-w4a8-defaults-learn-down_in"),
    ("W4A8: the outlier channels' 16-bit side path (`side`)", "onnxq-w4a8-defaults-learn-side"),
    ("W4A8: K and V outputs, the cache's ranges (`kv`)", "onnxq-w4a8-defaults-learn-kv"),
    ("W4A8: the 4-bit weights' rounding on GPTQ's codes (`rounding`)", "onnxq-w4a8-defaults-learn-rounding"),
    ("W8A8: weight steps per output channel (`scales`, the default)", "onnxq-w8a8-defaults-learn"),
)


def learning(results: dict[str, Any]) -> str:
    """What end-to-end learning gains on the default recipes, one parameter group at a time."""
    rows = results["rows"]
    present = [(label, name) for label, name in LEARNING if name in rows and "end_to_end" in rows[name]]
    if not present:
        return ""
    lines = [
        "## Learning end to end (`--learn`)",
        "",
        "`onnxq quantize --preset P --learn`, each row one parameter group (`--e2e-groups`) trained after GPTQ",
        "against the float model's next-token distribution: 48 steps of one calibration window each, on 32 windows;",
        "the guard compares the next-token NLL on 4 more calibration windows and writes the unlearned model where",
        "it did not fall. `vs --preset P`: against the row `onnxq-P-defaults`, the same recipe without `--learn`.",
        "Time and peak RSS are the whole quantization's; `stage` is the end-to-end stage alone.",
        "",
        "| learned | row | WikiText-2 PPL | vs --preset P | held-out NLL | kept | stage | time | peak RSS |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for label, name in present:
        row, e2e = rows[name], rows[name]["end_to_end"]
        base = rows.get(_unlearned(name), {}).get("eval", {}).get("ppl")
        ppl, q = row["eval"]["ppl"], row.get("quantize", {})
        change = f"{100 * (ppl / base - 1):+.2f} %" if base else ""
        nll = f"{e2e['heldout_nll_before']:.4f} -> {e2e['heldout_nll_after']:.4f}"
        lines.append(
            f"| {label} | {name} | {ppl:.2f} | {change} | {nll} | {'yes' if e2e['kept'] else 'no'} | "
            f"{e2e['seconds']:.0f} s | {q.get('seconds', 0):.0f} s | {q.get('peak_rss_mb', 0) / 1024:.2f} GB |"
        )
    htp = [
        (n, rows[n]["htp"])
        for n in dict.fromkeys(p for _, n in present for p in (_unlearned(n), n))
        if "htp" in rows.get(n, {})
    ]
    if htp:
        lines += [
            "",
            "On the QNN HTP backend (CPU fallback disabled), on the first evaluation windows, next to ONNX Runtime CPU",
            "on the same windows:",
            "",
            "| row | windows | PPL on the HTP | PPL on CPU |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {n} | {h['windows']} | {h['qnn']['ppl']:.2f} | {h['cpu']['ppl']:.2f} |" for n, h in htp]
    return "\n".join(lines) + "\n"


def _unlearned(name: str) -> str:
    """The defaults row a learning row is compared with."""
    return name.split("-defaults", maxsplit=1)[0] + "-defaults"


def pareto(results: dict[str, Any]) -> str:
    """The mixed-precision section: perplexity against the share promoted, and the selectors compared."""
    rows = results["rows"]
    ppl = {name: row["eval"]["ppl"] for name, row in rows.items()}
    if not any(name in ppl for _, name, _ in PARETO[1:4]):
        return ""
    fp = ppl.get("fp32")
    lines = [
        "## Mixed precision (sensitivity-guided)",
        "",
        "Perplexity against the share of 8-bit MatMul inputs promoted to 16 bits (`--budget`, chosen by the",
        "gradient-weighted quantization error, `fisher`); W4 weights GPTQ, W8 weights MSE-clipped.",
        "",
        "| promoted to A16 | W4A8 | W8A8 | W8A8 × FP32 |",
        "|---|---:|---:|---:|",
    ]
    for share, w4, w8 in PARETO:
        cells = [f"{ppl[n]:.2f}" if n in ppl else "" for n in (w4, w8)]
        ratio = f"{ppl[w8] / fp:.3f}" if w8 in ppl and fp else ""
        lines.append(f"| {share} | {cells[0]} | {cells[1]} | {ratio} |")
    lines += ["", "Selectors at the same budget:", "", "| candidates | fisher (measured) | relative error | random |"]
    lines += ["|---|---:|---:|---:|"]
    for label, names in SELECTORS:
        if any(n in ppl for n in names):
            cells = [f"{ppl[n]:.2f}" if n in ppl else "" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zeroshot_section(results: dict[str, Any]) -> str:
    """Zero-shot accuracy per row, and what packing requests into windows changes."""
    rows = {name: row for name, row in results["rows"].items() if "zeroshot" in row}
    if not rows:
        return ""
    tasks = [t for t in next(iter(rows.values()))["zeroshot"] if t != "peak_rss_mb"]
    items = {t: next(iter(rows.values()))["zeroshot"][t]["items"] for t in tasks}
    head = " | ".join(f"{t} acc | {t} acc_norm" for t in tasks)
    lines = [
        "## Zero-shot accuracy",
        "",
        "First " + ", ".join(f"{items[t]} {t} items" for t in tasks) + " (validation), scored as lm-eval-harness",
        "scores them (log-likelihood of each choice after the context; acc_norm per character), on ONNX Runtime",
        "CPU with `onnxq eval --tasks`; requests packed several to a 512-token window (`onnxq.evaluation.packing`).",
        "",
        f"| row | {head} | WikiText-2 PPL | time |",
        "|---|" + "---:|" * (2 * len(tasks) + 2),
    ]
    for name, row in rows.items():
        z = row["zeroshot"]
        cells = " | ".join(f"{100 * z[t]['acc']:.1f} | {100 * z[t]['acc_norm']:.1f}" for t in tasks)
        secs = sum(z[t]["seconds"] for t in tasks)
        lines.append(f"| {name} | {cells} | {row['eval']['ppl']:,.4g} | {secs:.0f} s |")
    checks = [
        (name, t, row["zeroshot"][t]["unpacked"])
        for name, row in rows.items()
        for t in tasks
        if "unpacked" in row["zeroshot"][t]
    ]
    if checks:
        lines += [
            "",
            "Packed against one request per window, same items (the reference path, `--no-pack`): the float",
            "graph agrees to rounding; on a QDQ graph a different summation order can move a value across a",
            "rounding boundary, which then propagates.",
            "",
            "| row | task | items | acc packed | acc one per window | same choice | max abs Δ log p | mean abs Δ log p "
            "| time packed | time one per window |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t, u in checks:
            z = results["rows"][name]["zeroshot"][t]
            packed_secs = z["seconds"] * u["items"] / z["items"]
            lines.append(
                f"| {name} | {t} | {u['items']} | {100 * u['acc_packed']:.1f} | {100 * u['acc']:.1f} | "
                f"{100 * u['same_choice']:.0f} % | {u['max_abs_dlogp']:.2g} | {u['mean_abs_dlogp']:.2g} | "
                f"{packed_secs:.0f} s | {u['seconds']:.0f} s |"
            )
    return "\n".join(lines) + "\n"


def table(results: dict[str, Any]) -> str:
    """The Markdown table of BENCHMARKS.md."""
    rows = results["rows"]
    fp = rows.get("fp32", {}).get("eval", {}).get("ppl")
    lines = [
        "| row | tool | preset | rotation | calibration | WikiText-2 PPL | × FP32 | time | peak RSS |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ppl = row["eval"]["ppl"]
        ratio = "" if not fp else f"{ppl / fp:.3f}" if ppl / fp < 100 else f"{ppl / fp:.3g}"
        q = row.get("quantize", {})
        secs = f"{q['seconds']:.0f} s" if "seconds" in q else ""
        rss = f"{q['peak_rss_mb'] / 1024:.2f} GB" if q.get("peak_rss_mb") else ""
        ppl_s = f"{ppl:,.2f}" if ppl < 1e5 else f"{ppl:.3g}"
        rot, method = _describe(row)
        preset = row["preset"] or "float"
        lines.append(f"| {name} | {row['tool']} | {preset} | {rot} | {method} | {ppl_s} | {ratio} | {secs} | {rss} |")
    return "\n".join(lines)


def _dated(step: dict[str, Any], row: dict[str, Any]) -> str:
    """A note when an HTP step was measured on an earlier quantization of the same row."""
    return f" (measured {step['date']}, same recipe)" if step.get("date", row["date"]) != row["date"] else ""


def write(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    val = ""
    for name, row in results["rows"].items():
        v = row.get("validate")
        if v:
            val += (
                f"- `{name}` on the QNN HTP backend (CPU fallback disabled): {v['nodes_on_qnn']} of "
                f"{v['nodes_total']} nodes on QNN; logits vs ONNX Runtime CPU on {v['windows']} windows: max "
                f"|Δ| {v['max_abs_error']:.3g} ({v['error_in_steps']:.0f} output steps), mean "
                f"{v['mean_abs_error']:.3g}, top-1 agreement {100 * v['top1_agreement']:.1f} %; context binary "
                f"written and reloaded: {v['context_reloaded']}{_dated(v, row)}.\n"
            )
        c = row.get("compile")
        if c:
            sizes = ", ".join(f"{n} {b / 2**20:.1f} MB" for n, b in c["files"].items() if n.startswith("model_ctx"))
            val += (
                f"- `{name}` compiled by `onnxq compile` (QNN EP, HTP v75): {sizes}; compile "
                f"{c['seconds']['compile']:.0f} s, context reload {c['seconds']['load_context']:.0f} s, one window "
                f"on the HTP emulator {c['seconds']['run_once']:.0f} s, peak RSS {c['peak_rss_mb'] / 1024:.2f} GB"
                f"{_dated(c, row)}.\n"
            )
    text = f"""# Benchmarks

{results["model"]}, static shapes [1, {results["seq_len"]}].
Calibration: {results["calibration"]["data"]}, first {results["calibration"]["windows"]} windows of
{results["seq_len"]} tokens (a row whose recipe names more windows, as the GPTQ defaults do, takes its first N).
Evaluation: WikiText-2 test, first {results["evaluation"]["windows"]} windows of {results["seq_len"]} tokens,
ONNX Runtime CPU. Every row comes from `python tools/bench.py` on the same exported graph and the same token
windows ({results["machine"]["cpus"]} CPUs, last run {results["date"]}; each row's date and raw numbers in
`tools/results/bench.json`). Time and peak RSS are those of the quantization, in its own process.

{table(results)}

`onnxq-*-defaults` rows: `onnxq quantize --preset P` with no other flag; the method cells are what the run
resolved (its `recipe.toml`, kept in the row's `recipe`). The other onnxq rows pin every option they do
not name to the defaults of the time they were measured (no outlier split, no R4, MSE rounding for 8-bit
weights), so that each one isolates its own change.

`ort-w*` rows: `onnxruntime.quantization` with `get_qnn_qdq_config` (MinMax, per-tensor weights, its
defaults) on the graph as exported, with the same calibration windows. They fail on this graph even at
W8A16 because each per-tensor range must cover the x² inside the decomposed RMSNorm (up to 7.5e8 on
SmolLM2; `onnxq check` reports it as `huge-range`): every ordinary value then rounds to a few steps.

`ort-canonical-*` rows: the strongest set-up of the same quantizer a user can make: onnxq's canonical
float graph (fused RMSNorm, finite mask, untied embedding) and every MatMul weight symmetric per output
channel through `init_overrides` (`per_channel=True` alone leaves MatMul weights per tensor), the lm_head
at 8 bits with 4-bit presets as onnxq keeps it (`tools/ort_baseline.py --canonical`). `aimet-*` rows:
Qualcomm AIMET's `QuantizationSimModel` (aimet-onnx 2.42.0, `htp_v73` config: per-channel weights) on the
same canonical graph, lm_head at 8 bits, min/max or its `tf_enhanced` histogram search, exported with
`to_onnx_qdq` and evaluated like every row (`tools/aimet_baseline.py`). Neither has a way to keep static
8-bit activations on this model: both lose it at W8A8.

onnxq `a8` presets keep the residual stream, norms and softmax at 16 bits and put every MatMul input at
8 bits (see README). Calibration `auto`: min/max at 16 bits, MSE-optimal clipping at 8 bits; weights `mse`:
per-channel clipping search then round to nearest; `gptq`: the same scales, GPTQ rounding.

{val}"""
    text += ("\n" + outliers(results)) if outliers(results) else ""
    text += ("\n" + ablation(results)) if ablation(results) else ""
    text += ("\n" + learning(results)) if learning(results) else ""
    text += ("\n" + pareto(results)) if pareto(results) else ""
    text += ("\n" + zeroshot_section(results)) if zeroshot_section(results) else ""
    diagnostics = RESULTS.parent / "diagnostics.json"
    if diagnostics.exists():
        sys.path.insert(0, str(ROOT))
        from tools.diagnose import section

        text += "\n" + section(json.loads(diagnostics.read_text(encoding="utf-8")))
    fulltest = RESULTS.parent / "fulltest.json"
    if fulltest.exists():
        sys.path.insert(0, str(ROOT))
        from tools.bench_fulltest import section as fulltest_section

        text += "\n" + fulltest_section(json.loads(fulltest.read_text(encoding="utf-8")))
    generation = RESULTS.parent / "generate.json"
    if generation.exists():
        sys.path.insert(0, str(ROOT))
        from tools.bench_generate import section as generation_section

        text += "\n" + generation_section(json.loads(generation.read_text(encoding="utf-8")))
    pair = RESULTS.parent / "pair.json"
    if pair.exists():
        sys.path.insert(0, str(ROOT))
        from tools.bench_pair import section as pair_section

        text += "\n" + pair_section(json.loads(pair.read_text(encoding="utf-8")))
    scale = RESULTS.parent / "scale.json"
    if scale.exists():
        from tools.bench_scale import section as scale_section

        text += "\n" + scale_section(json.loads(scale.read_text(encoding="utf-8")))
    TABLE.write_text(text, encoding="utf-8")
    from tools.readme import update

    update()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="float ONNX model (default: export the embedded SmolLM2-135M)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="scratch folder")
    parser.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--validate", default=",".join(VALIDATE), help="rows also run on the HTP (2 windows)")
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--compile", default="", help="rows also compiled to an HTP context binary (QNN EP)")
    parser.add_argument("--htp-eval", default="", help="rows also scored on the HTP backend (--htp-windows windows)")
    parser.add_argument("--htp-windows", type=int, default=4)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="only the --compile, --htp-eval and --tasks steps on the last run's models (--rows, or the rows named)",
    )
    parser.add_argument("--tasks", default="", help="zero-shot tasks for every row run, e.g. piqa,hellaswag")
    parser.add_argument("--task-limit", type=int, default=500, help="first N items of each task (default 500)")
    parser.add_argument("--pack-check", default="fp32,onnxq-w4a8", help="rows also scored one request per window")
    parser.add_argument("--pack-check-items", type=int, default=100, help="items of that check (default 100)")
    parser.add_argument("--fresh", action="store_true", help="drop rows measured by earlier runs")
    parser.add_argument("--dry", action="store_true", help="print the results, do not write files")
    args = parser.parse_args()
    results = run(args)
    if args.dry:
        print(json.dumps(results, indent=1))
    else:
        print(table(results))


if __name__ == "__main__":
    main()

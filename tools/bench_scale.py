"""Scaling: export, quantize and compile models of real shapes, with the time and peak memory of each step.

    python tools/bench_scale.py [--models smollm2-360m,llama-3.2-1b] [--steps export,w8a16,compile-w8a16]

SmolLM2-135M is the real model (the GGUF the package ships); the others are built from their real
configurations with seeded random weights and written as a Hugging Face folder, so that every step
runs as a user runs it (`onnxq export FOLDER`, `onnxq quantize`, `onnxq compile`). Their accuracy
means nothing; their cost and limits are real. Each step runs in a fresh process and reports that
process's peak RSS. Steps: ``export``, a quantize preset (``w8a16``, ``w4a8`` with the pair bench's
best recipe, ``w4a8-learn``) and ``compile-<preset>`` (the scoring graph, in parts over 1800 MB; the
reloaded binary runs one window on the HTP backend without CPU fallback).
Rows are kept across runs, keyed by model and step. Writes ``tools/results/scale.json`` and the
"Scaling" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import bench  # noqa: E402
from tools.bench_pair import QUIET, RECIPES  # noqa: E402

RESULTS = ROOT / "tools" / "results" / "scale.json"
WORK = ROOT / "runs" / "scale"
SEQ_LEN = 512
CALIB_WINDOWS = 16

#: Hugging Face configurations of the models users deploy (values from their published config.json)
CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-360m": {
        "model_type": "llama",
        "hidden_size": 960,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "intermediate_size": 2560,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
}
MODELS = ("smollm2-135m", *CONFIGS)
PRESETS = {
    "w8a16": ("w8a16", RECIPES["w8a16"]),
    "w4a8": ("w4a8", RECIPES["w4a8"]),
    "w4a8-learn": ("w4a8", [*RECIPES["w4a8"], "--learn"]),
}


def build(name: str, folder: Path) -> None:
    """Write ``name``'s configuration with seeded random weights (std 0.02, norms 1) and SmolLM2's tokenizer
    (its ids fit every vocabulary here) as a Hugging Face folder."""
    code = (
        "import json, sys, torch; from transformers import AutoConfig, AutoModelForCausalLM; "
        f"cfg = dict(json.loads({json.dumps(json.dumps(CONFIGS[name]))})); kind = cfg.pop('model_type'); "
        "config = AutoConfig.for_model(kind, **cfg); torch.manual_seed(0); "
        "model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32); "
        "[p.data.normal_(0.0, 0.02) for n, p in model.named_parameters() if p.dim() == 2]; "
        f"model.save_pretrained({str(folder)!r}); print(json.dumps({{}}))"
    )
    bench._run([sys.executable, "-c", code])
    from onnxq.core.sources import load_tokenizer, resolve

    load_tokenizer(resolve(None)).save_pretrained(folder)


def _cli(args: list[str]) -> dict[str, Any]:
    """An onnxq command in a fresh process: its peak RSS, its wall time and its own --json result."""
    code = (
        "import json, time; from onnxq.cli import main; from onnxq.stages.metrics import peak_rss_mb; "
        f"t = time.perf_counter(); rc = main({[*args, '--json', '-q']!r}); "
        "print(); print(json.dumps({'rc': rc, 'seconds': round(time.perf_counter() - t, 1), "
        "'peak_rss_mb': peak_rss_mb()}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    head, _, last = proc.stdout.strip().rpartition("\n")
    if proc.returncode != 0 or json.loads(last)["rc"] != 0:
        raise RuntimeError(f"onnxq {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(last), "result": json.loads(head)}


def _params(model: Path) -> int:
    """Float weights in an exported graph (a tied embedding once)."""
    import numpy as np
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return int(sum(np.prod(t.dims) for t in proto.graph.initializer if t.data_type in floats and len(t.dims) >= 1))


def _size_mb(folder: Path, pattern: str) -> float:
    return round(sum(p.stat().st_size for p in folder.glob(pattern)) / 2**20, 1)


def run_step(name: str, step: str, work: Path) -> dict[str, Any]:
    source = work / "hf"
    exported = work / "export" / "model.onnx"
    if step == "export":
        if name != "smollm2-135m" and not (source / "config.json").exists():
            shutil.rmtree(source, ignore_errors=True)
            build(name, source)
        ref = [] if name == "smollm2-135m" else [str(source)]
        shutil.rmtree(exported.parent, ignore_errors=True)
        out = _cli(["export", *ref, "-o", str(exported), "--seq-len", str(SEQ_LEN)])
        out.pop("result")
        return {**out, "params": _params(exported), "onnx_mb": _size_mb(exported.parent, "model.onnx*")}
    if step in PRESETS:
        preset, flags = PRESETS[step]
        target = work / step
        windows = ["--windows", str(CALIB_WINDOWS)]
        out = _cli(["quantize", str(exported), "-o", str(target), "--preset", preset, *windows, *QUIET, *flags])
        out.pop("result")
        summary = json.loads((target / "summary.json").read_text(encoding="utf-8"))
        calib = summary["calibration"]["seconds"]
        return {
            **out,
            "flags": " ".join(flags),
            "qdq_mb": _size_mb(target, "model.qdq.onnx*"),
            "calib_seconds_per_window": round(calib / summary["calibration"]["windows"], 2),
        }
    if step.startswith("compile-"):
        target = work / step
        qdq = work / step.removeprefix("compile-") / "model.qdq.onnx"
        # as `onnxq compile` does, less the compiling session's own run: the reloaded binary still runs
        # once on the HTP backend, without CPU fallback (one emulated run of a 1B graph takes minutes)
        code = (
            "import json, time; from onnxq.device.compile import compile_model; "
            "from onnxq.stages.metrics import peak_rss_mb; t = time.perf_counter(); "
            f"r = compile_model({str(qdq)!r}, {str(target)!r}, overwrite=True, verify=False); "
            "print(json.dumps({'rc': 0, 'seconds': round(time.perf_counter() - t, 1), "
            "'peak_rss_mb': peak_rss_mb(), 'steps': r.seconds}))"
        )
        out = bench._run([sys.executable, "-c", code])
        parts = sorted(target.glob("*_qnn.bin"))
        return {**out, "context_parts_mb": [round(p.stat().st_size / 2**20, 1) for p in parts]}
    raise SystemExit(f"unknown step {step!r}")


def section(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for ``results``."""
    lines = [
        "## Scaling",
        "",
        f"`python tools/bench_scale.py`: each step in its own process on this machine ({bench._cpus()} cores), "
        f"peak RSS of that process. Scoring graphs of {SEQ_LEN} tokens, {CALIB_WINDOWS} calibration windows. "
        "SmolLM2-135M is the real model; the others are random weights in their real configuration, so only their "
        "cost is meaningful. W4A8 uses the pair bench's best recipe. Memory target: peak RSS within 1.5 x the "
        "float32 weights + 2 GB. A compile step's seconds include one run of the reloaded context on the "
        "HTP backend (the x86-64 emulator, CPU fallback off) on one window.",
        "",
        "| model | parameters | step | seconds | peak RSS | peak / target | output | calibration s/window |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for name in MODELS:
        rows = results.get("models", {}).get(name, {})
        params = rows.get("export", {}).get("params")
        for step, row in rows.items():
            if step == "export":
                output = f"{row.get('onnx_mb', 0):.0f} MB ONNX"
            elif step.startswith("compile-"):
                parts = row.get("context_parts_mb", [])
                output = f"{len(parts)} context part(s): " + " + ".join(f"{p:.0f} MB" for p in parts)
                if "steps" in row:
                    output += ", of which compiling " + " + ".join(
                        f"{v:.0f} s" for k, v in row["steps"].items() if k.endswith("compile")
                    )
            else:
                output = f"{row.get('qdq_mb', 0):.0f} MB QDQ"
            per_window = row.get("calib_seconds_per_window")
            target = "" if params is None else f"{row['peak_rss_mb'] / (1.5 * params * 4 / 2**20 + 2048):.2f}"
            lines.append(
                f"| {name} | {'' if params is None else f'{params / 1e6:.0f} M'} | {step} {row.get('flags', '')} "
                f"| {row['seconds']:.0f} | {row['peak_rss_mb']:.0f} MB | {target} | {output} | "
                f"{'' if per_window is None else f'{per_window:.1f}'} |"
            )
    return "\n".join([*lines, "", *_fit(results)]) + "\n"


#: models too large to build here, by parameters (Llama-3.2-3B, Llama-3.1-8B), for the fit's prediction
BEYOND = {"llama-3.2-3b": 3.21e9, "llama-3.1-8b": 8.03e9}


def _fit(results: dict[str, Any]) -> list[str]:
    """Seconds and peak RSS of each quantize step, fitted as a line in the parameters over the models
    measured, and what that line says for the models in :data:`BEYOND`."""
    import numpy as np

    lines = ["Fit (least squares, a line in the parameters, over the models above):", ""]
    for step in PRESETS:
        points = [
            (rows["export"]["params"], rows[step]["seconds"], rows[step]["peak_rss_mb"])
            for rows in results.get("models", {}).values()
            if "params" in rows.get("export", {}) and step in rows
        ]
        if len(points) < 3:
            continue
        params, seconds, peak = (np.array(v, dtype=np.float64) for v in zip(*points, strict=True))
        time_fit, peak_fit = np.polyfit(params / 1e9, seconds, 1), np.polyfit(params / 1e9, peak, 1)
        guesses = "; ".join(
            f"{name} ({n / 1e9:.1f} B): {np.polyval(time_fit, n / 1e9) / 60:.0f} min, "
            f"{np.polyval(peak_fit, n / 1e9) / 1024:.1f} GB"
            for name, n in BEYOND.items()
        )
        lines.append(
            f"- {step} ({len(points)} models): {time_fit[0] / 60:.1f} min and {peak_fit[0] / 1024:.1f} GB per billion "
            f"parameters (intercepts {time_fit[1] / 60:.1f} min, {peak_fit[1] / 1024:.1f} GB); {guesses}."
        )
    return lines if len(lines) > 2 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", default="export,w8a16,compile-w8a16,w4a8,compile-w4a8,w4a8-learn")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {"models": {}}
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; one of {', '.join(MODELS)}")
        work = WORK / name
        for step in args.steps.split(","):
            print(f"[scale] {name} {step} ...", flush=True)
            row = run_step(name, step, work)
            results["models"].setdefault(name, {})[step] = row
            print(f"[scale] {name} {step}: {row}", flush=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))


if __name__ == "__main__":
    main()

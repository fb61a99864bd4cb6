"""Generation benchmark: SmolLM2's KV-cache graphs, float and quantized, on ONNX Runtime CPU and the HTP.

    python tools/bench_generate.py [--presets w8a16,w4a8] [--chunk 64] [--context 256] [--reuse]

For each preset: export (once) the prefill/decode graphs, quantize them with the preset's best
recipe (``tools/bench_pair.py``'s, in its own process; ``--reuse --work runs/pair --context 512``
takes the pairs the pair bench quantized), and measure (1) greedy generation for a fixed prompt
(the text, prefill and decode tokens/s), (2) how far the decode graph's logits are from the prefill
graph's for the same positions (the same WikiText-2 tokens run both ways), (3) top-1 agreement of the
quantized graphs with the float ones there, (4) the same prompt in onnxruntime-genai's own loop on
the folder `onnxq package` writes, on CPU, and (5) generation on the HTP, from the QDQ pair and from
its compiled context binaries. Writes ``tools/results/generate.json`` and the "Generation" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "tools" / "results" / "generate.json"
PROMPT = "The capital of France is"


def measure(
    folder: Path, ids: np.ndarray, chunk: int, reference: np.ndarray | None
) -> tuple[dict[str, Any], np.ndarray]:
    """The row for one folder of graphs, and its prefill logits (the reference of later rows)."""
    from onnxq.device import genai
    from onnxq.device.generate import Stepper, generate

    out = generate(folder, PROMPT, max_new_tokens=24)
    packaged = genai.package(folder, folder.parent / f"{folder.name}-genai", overwrite=True)
    in_genai = genai.generate(packaged.output, PROMPT, max_new_tokens=24)
    by_prefill = Stepper(folder).step(ids)  # chunks
    stepper = Stepper(folder)
    by_decode = np.concatenate([stepper.step(ids[:chunk]), *(stepper.step([t]) for t in ids[chunk:])])
    tail = slice(chunk, len(ids))  # positions the decode graph computed
    row: dict[str, Any] = {
        "text": out.text,
        "starts_with_paris": out.text.strip().startswith("Paris"),
        "prefill_tokens_per_s": round(out.prefill_tps, 2),
        "decode_tokens_per_s": round(out.decode_tps, 2),
        "decode_vs_prefill_max_abs": float(np.abs(by_decode[tail] - by_prefill[tail]).max()),
        "decode_vs_prefill_top1": float((by_decode[tail].argmax(-1) == by_prefill[tail].argmax(-1)).mean()),
        "genai": {
            "version": packaged.loaded_by,
            "text": in_genai.text,
            "starts_with_paris": in_genai.text.strip().startswith("Paris"),
            "same_tokens_as_onnxq": in_genai.tokens == out.tokens[: len(in_genai.tokens)],
            "tokens": len(in_genai.tokens),
            "decode_tokens_per_s": round(in_genai.decode_tps, 2),
        },
    }
    if reference is not None:
        row["top1_vs_float"] = float((by_prefill.argmax(-1) == reference.argmax(-1)).mean())
    return row, by_prefill


def on_htp(folder: Path, tokens: int) -> dict[str, Any]:
    """The quantized pair on the HTP backend: `onnxq generate --ep qnn` on the QDQ pair, and the pair
    compiled (`onnxq compile`, HTP v75) and packaged, in onnxruntime-genai on the QNN EP."""
    from onnxq.device import genai
    from onnxq.device.compile import compile_model
    from onnxq.device.generate import generate

    compiled = compile_model(folder, folder.parent / f"{folder.name}-htp", overwrite=True, verify=False)
    packaged = genai.package(compiled.output, folder.parent / f"{folder.name}-htp-genai", overwrite=True)
    direct = generate(folder, PROMPT, max_new_tokens=tokens, ep="qnn")
    in_genai = genai.generate(packaged.output, PROMPT, max_new_tokens=tokens, ep="qnn")
    return {
        "text": direct.text,
        "genai_text": in_genai.text,
        "starts_with_paris": direct.text.strip().startswith("Paris"),
        "genai_same_tokens": in_genai.tokens == direct.tokens[: len(in_genai.tokens)],
        "tokens": len(in_genai.tokens),
        "context_bytes": {n: b for n, b in compiled.files.items() if n.endswith(".bin")},
        "compile_seconds": round(sum(v for k, v in compiled.seconds.items() if k.endswith("compile")), 1),
    }


def main() -> None:
    from calib.data import windows
    from onnxq.core.sources import tokenizer_for
    from onnxq.stages.export_kv import export_kv
    from tools.bench_pair import QUIET, RECIPES, run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="w8a16,w4a8")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=96, help="WikiText-2 tokens run through both graphs")
    parser.add_argument("--work", default=str(ROOT / "runs" / "generate"))
    parser.add_argument("--htp-tokens", type=int, default=8, help="tokens generated on the HTP (0: skip it)")
    parser.add_argument(
        "--reuse", action="store_true", help="keep pairs quantized by an earlier run (e.g. the pair bench's)"
    )
    args = parser.parse_args()
    work = Path(args.work)
    float_dir = work / "float"
    results: dict[str, Any] = {"chunk": args.chunk, "context": args.context, "prompt": PROMPT, "rows": {}}
    if RESULTS.exists():  # rows of presets not run now are kept when measured the same way
        before = json.loads(RESULTS.read_text(encoding="utf-8"))
        if all(before.get(k) == results[k] for k in ("chunk", "context", "prompt")):
            results["rows"] = before["rows"]
    t = time.perf_counter()
    if not (float_dir / "model.onnx").exists():
        export_kv(None, float_dir, chunk=args.chunk, context=args.context, overwrite=True)
    results["export_seconds"] = round(time.perf_counter() - t, 1)
    tok = tokenizer_for(float_dir / "prefill.onnx")
    ids = windows(tok, "wikitext2", args.tokens, 1).ids[0]
    row, reference = measure(float_dir, ids, args.chunk, None)
    results["rows"]["float"] = row
    for preset in [p for p in args.presets.split(",") if p]:
        out = work / preset
        if not (args.reuse and (out / "summary.json").exists()):
            run("quantize", str(float_dir), "-o", str(out), "--preset", preset, *RECIPES[preset], *QUIET)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        row, _ = measure(out, ids, args.chunk, reference)
        row["quantize_seconds"] = summary["seconds"]
        row["peak_rss_mb"] = summary["peak_rss_mb"]
        if args.htp_tokens:
            row["htp"] = on_htp(out, args.htp_tokens)
        row["recipe"] = tomllib.loads((out / "recipe.toml").read_text(encoding="utf-8"))["options"]
        results["rows"][preset] = row
        print(f"[generate] {preset}: {row['text']!r}", file=sys.stderr, flush=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    from tools import bench

    if bench.RESULTS.exists():  # refresh BENCHMARKS.md, which carries this section
        bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))
    print(json.dumps(results, indent=1))


def section(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for ``results`` (called by tools/bench.py when it writes the file)."""
    lines = [
        "## Generation (KV-cache graphs)",
        "",
        f"`onnxq export --kv-cache --chunk {results['chunk']} --context {results['context']}`, quantized with "
        "`onnxq quantize FOLDER` and each preset's best recipe (flags below), greedy `onnxq generate` on "
        "ONNX Runtime CPU (2 cores) for "
        f"{results['prompt']!r}; decode vs prefill: the same WikiText-2 tokens through both graphs, "
        "positions after the first chunk (`python tools/bench_generate.py`).",
        "",
        "| graphs | continuation | prefill tok/s | decode tok/s | decode vs prefill max abs | top-1 vs float |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in results["rows"].items():
        top1 = f"{100 * r['top1_vs_float']:.1f} %" if "top1_vs_float" in r else ""
        lines.append(
            f"| {name} | {_cell(r['text'])} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_vs_prefill_max_abs']:.3g} | {top1} |"
        )
    rows = {name: r for name, r in results["rows"].items() if "genai" in r}
    if rows:
        version = next(iter(rows.values()))["genai"]["version"]
        lines += [
            "",
            f"The same graphs through `onnxq package`, run by onnxruntime-genai {version} (its own generation "
            "loop, ONNX Runtime CPU), greedy, same prompt:",
            "",
            "| graphs | recipe | continuation in onnxruntime-genai | same tokens as onnxq generate | decode tok/s |",
            "|---|---|---|---|---:|",
        ]
        for name, r in rows.items():
            g = r["genai"]
            same = f"{'yes' if g['same_tokens_as_onnxq'] else 'no'} ({g['tokens']} tokens)"
            tps = g["decode_tokens_per_s"]
            lines.append(f"| {name} | {_recipe(r.get('recipe'))} | {_cell(g['text'])} | {same} | {tps:.1f} |")
    htp = {name: r["htp"] for name, r in results["rows"].items() if "htp" in r}
    if htp:
        lines += [
            "",
            "On the HTP (the QNN EP's HTP backend, here its x86-64 emulator, HTP v75, CPU fallback off for the "
            "QDQ pair): `onnxq generate --ep qnn` on the quantized pair, and the same pair compiled "
            "(`onnxq compile`), packaged and run by onnxruntime-genai on the QNN EP (the packaged folder's few "
            "position, mask and cache-write nodes run on the CPU):",
            "",
            "| graphs | onnxq generate --ep qnn | compiled, in onnxruntime-genai | same tokens | context binaries "
            "| compile |",
            "|---|---|---|---|---|---:|",
        ]
        for name, h in htp.items():
            sizes = " + ".join(f"{b / 2**20:.0f} MB" for b in h["context_bytes"].values())
            same = f"{'yes' if h['genai_same_tokens'] else 'no'} ({h['tokens']} tokens)"
            lines.append(
                f"| {name} | {_cell(h['text'])} | {_cell(h['genai_text'])} | {same} | {sizes} | "
                f"{h['compile_seconds']:.0f} s |"
            )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|")[:60]


def _recipe(options: dict[str, Any] | None) -> str:
    """The options of a KV row as flags, with what it leaves out of the scoring graph's defaults."""
    if not options:
        return "float"
    preset = options["preset"]
    parts = [f"--preset {preset}", f"--weight-method {options['weight_method']}"]
    if preset.startswith("w4"):
        parts += [f"--weight-block {options['weight_block']}", f"--gptq-sweeps {options.get('gptq_sweeps', 0)}"]
    if preset != "w8a16" and not options.get("online_hadamard"):
        parts.append("--online-hadamard none")
    if preset.endswith("a8") and not options.get("split_outliers"):
        parts.append("--split-outliers 0")
    if options.get("budget"):
        parts.append(f"--budget {options['budget']}")
    return " ".join(parts)


if __name__ == "__main__":
    main()

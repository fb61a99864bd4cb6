"""The cross-paper protocol: SmolLM2-135M on the whole WikiText-2 test in windows of 2048 tokens.

    python tools/bench_fulltest.py [--rows fp32,w8a16,w8a8,w4a16,w4a8]

Published numbers for this model use this protocol (Samsung TICO: float 17.38, 4-bit weights with
static 16-bit activations 19.00, +9.3 %), which the 512-token bench cannot be set beside. Each row
exports the model at 2048 tokens (once), quantizes it with the preset's best recipe from the bench,
calibrated on as many C4 tokens as that bench row (its windows x 512 / 2048), and evaluates every
2048-token window of the test on ONNX Runtime CPU. Writes ``tools/results/fulltest.json`` and its
section of BENCHMARKS.md. Rows already measured are kept; ``--rows`` picks which to (re)run.
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
ROWS = {
    "fp32": "fp32",
    "w8a16": "onnxq-w8a16",
    "w8a8": "onnxq-w8a8-split-r4-gptq",
    "w4a16": "onnxq-w4a16-lpbq16-w64-sweeps",
    "w4a8": "onnxq-w4a8-split-r4-lpbq16-w64-sweeps-mp10",
}
#: published relative losses on this model and protocol, set beside the rows
PUBLISHED = [("Samsung TICO", "float", 17.38, None), ("Samsung TICO", "W4A16 (static A16, SpinQuant)", 19.00, 0.093)]


def run(rows: list[str], work: Path) -> dict[str, Any]:
    from calib.data import windows
    from onnxq.export import export
    from onnxq.sources import tokenizer_for

    work.mkdir(parents=True, exist_ok=True)
    model = work / "smollm2-2048" / "model.onnx"
    if not model.exists():
        export(None, model, seq_len=SEQ_LEN, overwrite=True)
    tok = tokenizer_for(model)
    ev = windows(tok, "wikitext2", SEQ_LEN)  # every window of the test
    np.save(work / "eval-2048.npy", ev.ids)
    results = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {"rows": {}}
    results.update(seq_len=SEQ_LEN, windows=len(ev), tokens=int(ev.ids.size), test_tokens=ev.total_tokens)
    for name in rows:
        print(f"[fulltest] {name} ...", file=sys.stderr, flush=True)
        tool, preset, extra = bench.ROWS[ROWS[name]]
        row: dict[str, Any] = {"bench_row": ROWS[name], "date": time.strftime("%Y-%m-%d")}
        target = model
        if tool == "onnxq":
            extra = dict(extra)  # the bench row's calibration tokens: its windows (default 16) of 512
            extra["windows"] = max(1, round(extra.get("windows", 16) * SCALE))
            row["options"] = extra
            out = work / f"fulltest-{name}"
            row["quantize"] = bench.step_quantize_onnxq(model, out, preset, "c4", extra["windows"], extra)
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
    lines = [
        "## Full WikiText-2 test, 2048-token windows (the protocol of published results)",
        "",
        f"Every one of the {results['windows']} windows of {results['seq_len']} tokens of the WikiText-2 test "
        f"({results['tokens']:,} of its {results['test_tokens']:,} tokens), ONNX Runtime CPU; each model "
        "exported at 2048 tokens and quantized with the recipe of the named 512-token bench row, calibrated "
        "on as many C4 tokens. `python tools/bench_fulltest.py`; raw numbers in `tools/results/fulltest.json`.",
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
    lines += ["", "Published on the same model and protocol:", ""]
    for who, what, ppl, rel in PUBLISHED:
        lines.append(f"- {who}, {what}: {ppl:.2f}" + (f" ({100 * rel:+.1f} % vs its float)" if rel else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="scratch folder")
    args = parser.parse_args()
    wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"bench_fulltest: unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = run(wanted, Path(args.work))
    if bench.RESULTS.exists():
        bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

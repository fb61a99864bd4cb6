"""Where accuracy is lost, on the bench's own models: per-layer diff with and without rotation, what
each 8-bit activation role of the best W4A8 model costs, and the memory of calibration against its
length.

Runs after ``tools/bench.py`` (it reads the bench's work folder: the exported SmolLM2 graph, the
token windows and the ``onnxq-w4a8`` / ``onnxq-w4a8-norot`` / :data:`ROLES_ROW` outputs) and writes
``tools/results/diagnostics.json``; ``BENCHMARKS.md`` is regenerated with a section from it.

    python tools/diagnose.py                  # diff (1 window), activation roles (40 windows), calibration RSS
    python tools/diagnose.py --skip-rss       # only the diff and the activation roles
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import bench  # noqa: E402

DIAGNOSTICS = ROOT / "tools" / "results" / "diagnostics.json"
#: the bench row whose 8-bit activations are taken apart, and the role groups widened one at a time
ROLES_ROW = "onnxq-w4a8-split-r4-lpbq16-w64-sweeps"
ROLE_GROUPS = (
    ("q", "k"),
    ("q_rope", "k_rope"),
    ("v",),
    ("attn_out",),
    ("o_out",),
    ("gate", "up"),
    ("down_out",),
    ("attn_in:convert",),
    ("mlp_in:convert",),
    ("down_in:convert",),
)


def layer_diff(float_model: Path, qdq: Path, ids: np.ndarray) -> dict[str, Any]:
    from onnxq.evaluation.diff import diff

    report = diff(float_model, qdq, ids, ep="cpu")
    return {"layers": report.layers(), "first_jump": report.first_jump, "most_clipped": report.most_clipped}


def widen(qdq: onnx.ModelProto, points: dict[str, Any], roles: set[str] | None) -> tuple[onnx.ModelProto, int]:
    """A copy of ``qdq`` whose 8-bit activation points of ``roles`` (all: None) carry 16 bits.

    The real range stays; only the grid gets finer (uint8 -> uint16: scale / 257, zero point x 257;
    int8 -> int16: scale x 127 / 32767), so the difference in perplexity is what those 8 bits cost.
    A convert point's role is written ``role:convert``.
    """
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    del model.graph.value_info[:]  # the Q outputs' recorded types change
    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for name, p in points.items():
        if p["kind"] not in ("act", "convert") or p["bits"] != 8:
            continue
        role = p["role"] + (":convert" if p["kind"] == "convert" else "")
        if roles is not None and role not in roles:
            continue
        scale, zp = inits[f"{name}.scale"], inits[f"{name}.zero_point"]
        s, z = numpy_helper.to_array(scale), numpy_helper.to_array(zp)
        if z.dtype == np.uint8:
            s, z = s / 257, z.astype(np.uint16) * np.uint16(257)
        else:
            s, z = s * 127 / 32767, z.astype(np.int16)
        scale.CopyFrom(numpy_helper.from_array(s.astype(np.float32), scale.name))
        zp.CopyFrom(numpy_helper.from_array(z, zp.name))
        changed += 1
    return model, changed


def act_roles(folder: Path, ids: np.ndarray, scratch: Path) -> dict[str, Any]:
    """WikiText-2 perplexity of ``folder``'s model with each role group's 8-bit activations widened."""
    from onnxq.evaluation.evaluate import perplexity

    qdq = onnx.load(folder / "model.qdq.onnx")
    points = json.loads((folder / "precision_map.json").read_text(encoding="utf-8"))["points"]
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "widened.onnx"
    groups = [("none", set()), *((" + ".join(sorted(g)), set(g)) for g in ROLE_GROUPS), ("all", None)]
    rows = []
    for label, roles in groups:
        model, changed = widen(qdq, points, roles)
        onnx.save(model, path)
        rows.append({"widened": label, "points": changed, "ppl": perplexity(path, ids).ppl})
        print(rows[-1], flush=True)
    path.unlink()
    return {"row": folder.name, "windows": len(ids), "rows": rows}


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
    roles = diag.get("act_roles")
    if roles:
        base = roles["rows"][0]["ppl"]
        text += (
            f"## What the 8-bit activations cost (`{roles['row']}`, WikiText-2 {roles['windows']} x 512)\n\n"
            "The same QDQ model with one group of its 8-bit activation points widened to 16 bits (same\n"
            "range, finer grid); `:convert` is the 8-bit copy an FC reads of a 16-bit tensor.\n\n"
            "| widened to 16 bits | points | perplexity | change |\n|---|---:|---:|---:|\n"
        )
        for row in roles["rows"]:
            change = 100 * (row["ppl"] - base) / base
            text += f"| {row['widened']} | {row['points']} | {row['ppl']:.3f} | {change:+.2f} % |\n"
        groups = roles["rows"][1:-1]
        gains = {r["widened"]: 100 * (base - r["ppl"]) / base for r in groups}
        worse = [name for name, gain in gains.items() if gain < 0]
        text += (
            f"\nWidening all of them gains {100 * (base - roles['rows'][-1]['ppl']) / base:.2f} %; no single group "
            f"more than {max(gains.values()):.2f} %"
        )
        text += f", and {', '.join(worse)} widen for the worse.\n\n" if worse else ".\n\n"
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
    parser.add_argument("--skip-roles", action="store_true", help="skip the 8-bit activation roles (12 evaluations)")
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
    if not args.skip_roles:
        ids = np.load(work / "eval.npy")
        diag["act_roles"] = act_roles(work / ROLES_ROW, ids, work / "diagnose")
        DIAGNOSTICS.write_text(json.dumps(diag, indent=1) + "\n", encoding="utf-8")
    if not args.skip_rss:
        diag["calibration_rss"] = {str(n): calibration_rss(model, work / f"rss-{n}", n) for n in (16, 128)}
    DIAGNOSTICS.parent.mkdir(parents=True, exist_ok=True)
    DIAGNOSTICS.write_text(json.dumps(diag, indent=1) + "\n", encoding="utf-8")
    if bench.RESULTS.exists():
        bench.write(json.loads(bench.RESULTS.read_text(encoding="utf-8")))
    print(section(diag))


if __name__ == "__main__":
    main()

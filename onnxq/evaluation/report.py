"""``onnxq report OUT``: one self-contained HTML page (and the same figures as PNG) about a quantized model.

Figures, each drawn only when its data exists:

- ``rotation``: histograms of the q, o, up and down inputs of one layer in the float model, without
  and with the Hadamard rotations (the picture of why rotation makes static ranges possible), and
  their largest magnitude per layer;
- ``ranges``: the quantization range of each MatMul input per layer, as calibrated (or learned);
- ``precision``: int8/int16 activations per layer, and what mixed precision promoted;
- ``sensitivity``: the sensitivity ranking the mixed-precision choice used;
- ``learning``: each layer's output error before and after learning (initial vs learned ranges);
- ``layer_error``: SQNR of each layer's output, quantized vs float (``onnxq diff``);
- ``bench``: the benchmark table of this checkout (``tools/results/bench.json``), when present.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError
from onnxq.core.files import atomic_file

log = logging.getLogger(__name__)

ROLES = {"attn_in": "q/k/v input", "attn_out": "o_proj input", "mlp_in": "gate/up input", "down_in": "down_proj input"}
BENCH = Path(__file__).resolve().parents[2] / "tools" / "results" / "bench.json"


@dataclass
class Report:
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # figure -> why it was not drawn


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


# --------------------------------------------------------------------------- data
def _role_values(model_path: Path, rotate: str, ids: np.ndarray, seed: int) -> dict[tuple[int, str], np.ndarray]:
    """Values of the four MatMul-input roles, per layer, in the float model prepared with ``rotate``."""
    import onnx_ir as ir
    import torch

    from calib.mirror import Mirror
    from onnxq.stages.prepare import prepare

    prepared = prepare(ir.load(model_path), rotate=rotate, seed=seed)
    wanted = {
        name: (role.layer, role.kind)
        for name, role in prepared.roles.items()
        if role.kind in ROLES and role.layer is not None
    }
    found: dict[tuple[int, str], np.ndarray] = {}

    def tap(name: str, value: torch.Tensor) -> None:
        key = wanted.get(name)
        if key is not None and key not in found:
            found[key] = value.detach().float().reshape(-1).numpy()

    mirror = Mirror(prepared.model)
    with torch.inference_mode():
        mirror.run(mirror.window(ids), tap=tap)
    return found


# --------------------------------------------------------------------------- figures
def fig_rotation(before: dict, after: dict, path: Path) -> None:
    plt = _plt()
    layers = sorted({k[0] for k in after})
    layer = layers[len(layers) // 2]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for i, kind in enumerate(ROLES):
        ax = axes[0][i]
        for label, data, color in (("no rotation", before, "tab:red"), ("Hadamard", after, "tab:blue")):
            v = data.get((layer, kind))
            if v is not None:
                ax.hist(
                    v, bins=200, histtype="step", color=color, label=f"{label} (max {np.abs(v).max():.3g})", log=True
                )
        ax.set_title(f"layer {layer}: {ROLES[kind]}")
        ax.legend(fontsize=7)
        ax = axes[1][i]
        for label, data, color in (("no rotation", before, "tab:red"), ("Hadamard", after, "tab:blue")):
            pts = sorted((k[0], float(np.abs(v).max() / (v.std() + 1e-12))) for k, v in data.items() if k[1] == kind)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color, label=label, ms=3)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        if i == 0:
            ax.set_ylabel("max |x| / std: steps a range wastes")
        ax.legend(fontsize=7)
    fig.suptitle("Activation distributions without and with rotation (float model, 1 window)")
    _save(fig, path)


def fig_ranges(encodings: dict, pmap: dict, path: Path) -> bool:
    plt = _plt()
    series: dict[str, list[tuple[int, float]]] = {}
    for name, entry in pmap["points"].items():
        kind, layer = entry.get("role"), entry.get("layer")
        enc = encodings["points"].get(name, {})
        if kind not in ROLES or layer is None or "scale" not in enc or entry["kind"] not in ("act", "convert"):
            continue
        scale = float(np.asarray(enc["scale"]).reshape(-1)[0])
        zp = float(np.asarray(enc["zero_point"]).reshape(-1)[0])
        bits = int(entry["bits"])
        signed = str(enc.get("dtype", "")).startswith("int")
        qmin = -(1 << (bits - 1)) if signed else 0
        qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        span = max(abs((qmin - zp) * scale), abs((qmax - zp) * scale))
        series.setdefault(f"{ROLES[kind]} ({entry['kind']}, {bits}-bit)", []).append((layer, span))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("largest |value| the range covers")
    ax.set_title("Quantization ranges of the MatMul inputs (as calibrated / learned)")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def fig_precision(pmap: dict, path: Path) -> bool:
    plt = _plt()
    per: dict[int, dict[str, int]] = {}
    promoted = 0
    for entry in pmap["points"].values():
        layer = entry.get("layer")
        if layer is None or entry["kind"] not in ("act", "convert"):
            continue
        key = "promoted" if str(entry.get("why", "")).startswith("promoted") else f"int{entry['bits']}"
        promoted += key == "promoted"
        per.setdefault(layer, {}).setdefault(key, 0)
        per[layer][key] += 1
    if not per:
        return False
    layers = sorted(per)
    fig, ax = plt.subplots(figsize=(10, 4))
    bottom = np.zeros(len(layers))
    for key, color in (("int8", "tab:orange"), ("int16", "tab:blue"), ("promoted", "tab:green")):
        counts = np.array([per[layer].get(key, 0) for layer in layers])
        ax.bar(layers, counts, bottom=bottom, color=color, label=key)
        bottom += counts
    ax.set_xlabel("layer")
    ax.set_ylabel("activation quantizers")
    ax.set_title(f"Precision map: widths per layer ({promoted} promoted by sensitivity)")
    ax.legend()
    _save(fig, path)
    return True


def fig_sensitivity(mixed: dict, path: Path) -> bool:
    plt = _plt()
    scores = {**mixed.get("scores", {}), **mixed.get("weight_scores", {})}
    if not scores:
        return False
    chosen = set(mixed.get("promoted", [])) | set(mixed.get("promoted_weights", []))
    top = sorted(scores.items(), key=lambda kv: -kv[1])[:30]
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.barh(range(len(top)), [v for _, v in top], color=["tab:green" if n in chosen else "tab:gray" for n, _ in top])
    ax.set_yticks(range(len(top)), [n[-48:] for n, _ in top], fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"sensitivity ({mixed.get('selector')})")
    ax.set_title("Most sensitive tensors (green: promoted)")
    _save(fig, path)
    return True


def fig_learning(learning: dict, path: Path) -> bool:
    plt = _plt()
    layers = learning.get("layers") or []
    if not layers:
        return False
    idx = [entry.get("layer", i) for i, entry in enumerate(layers)]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(idx, [entry["eval_before"] for entry in layers], "o-", ms=3, label="initial ranges")
    ax.plot(idx, [entry["eval"] for entry in layers], "o-", ms=3, label="learned")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer output error vs float")
    ax.set_title("Learning, layer by layer")
    ax.legend()
    _save(fig, path)
    return True


def fig_layer_error(report: Any, path: Path) -> bool:
    plt = _plt()
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for p in report.points:
        if p.layer is not None and np.isfinite(p.sqnr_db):
            by_kind.setdefault(p.kind, []).append((p.layer, p.sqnr_db))
    if not by_kind:
        return False
    fig, ax = plt.subplots(figsize=(10, 4))
    for kind, pts in sorted(by_kind.items()):
        pts.sort()
        ax.plot(*zip(*pts, strict=True), "o-", ms=2, label=kind, lw=1)
    ax.set_xlabel("layer")
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title("Where the quantized model departs from float (onnxq diff, 1 window)")
    ax.legend(fontsize=6, ncol=4)
    _save(fig, path)
    return True


def fig_bench(bench: dict, path: Path) -> bool:
    plt = _plt()
    rows = [(name, row["eval"]["ppl"]) for name, row in bench.get("rows", {}).items() if "eval" in row]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    colors = ["tab:gray" if n == "fp32" else "tab:red" if n.startswith("ort") else "tab:blue" for n, _ in rows]
    ax.barh(range(len(rows)), [min(v, 1e4) for _, v in rows], color=colors)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("WikiText-2 perplexity (capped at 1e4; red: ONNX Runtime's quantizer)")
    ax.set_title(f"Benchmark: {bench.get('model', '')}")
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- the page
def report(
    folder: str | Path,
    *,
    float_model: str | Path | None = None,
    windows: np.ndarray | None = None,
    bench: str | Path | None = BENCH,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Write ``folder/report.html`` and ``folder/report/*.png`` for the quantized model in ``folder``."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        pmap = json.loads((folder / "precision_map.json").read_text(encoding="utf-8"))
        encodings = json.loads((folder / "encodings.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise OnnxqError(
            f"{folder} is not an onnxq output folder ({Path(exc.filename).name} missing)",
            "pass the folder `onnxq quantize` wrote",
        ) from None
    figs = folder / "report"
    figs.mkdir(exist_ok=True)
    out = Report(folder / "report.html")
    source = Path(float_model) if float_model else Path(summary.get("input", ""))
    qdq = folder / "model.qdq.onnx"

    def draw(name: str, fn: Callable[[Path], bool | None], why_not: str) -> None:
        if progress is not None:
            progress(name)
        path = figs / f"{name}.png"
        try:
            ok = fn(path)
        except OnnxqError as exc:
            out.skipped[name] = str(exc)
            return
        if ok is False:
            out.skipped[name] = why_not
        else:
            out.figures[name] = path

    if source.is_file() and windows is not None and qdq.exists():
        ids = np.asarray(windows[0], dtype=np.int64)
        seed = int(summary.get("rotation", {}).get("seed", 0))
        draw(
            "rotation",
            lambda p: fig_rotation(
                _role_values(source, "none", ids, seed), _role_values(source, "hadamard", ids, seed), p
            ),
            "",
        )
        from onnxq.evaluation.diff import diff

        draw("layer_error", lambda p: fig_layer_error(diff(source, qdq, windows[:1]), p), "no structural points")
    else:
        out.skipped["rotation"] = out.skipped["layer_error"] = "needs the float model and a window of text"
    draw("ranges", lambda p: fig_ranges(encodings, pmap, p), "no MatMul-input roles in the plan")
    draw("precision", lambda p: fig_precision(pmap, p), "no per-layer points")
    draw("sensitivity", lambda p: fig_sensitivity(summary.get("mixed_precision") or {}, p), "no mixed precision run")
    draw("learning", lambda p: fig_learning(summary.get("learning") or {}, p), "no learning run")
    bench_data = json.loads(Path(bench).read_text(encoding="utf-8")) if bench and Path(bench).exists() else {}
    draw("bench", lambda p: fig_bench(bench_data, p), "no benchmark results in this checkout")
    _write_html(out, summary)
    return out


def _write_html(out: Report, summary: dict) -> None:
    counts = summary.get("counts", {})
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in counts.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>onnxq report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "td{padding:2px 8px}</style></head><body>",
        f"<h1>onnxq report: {html.escape(str(summary.get('input', '')))}</h1>",
        f"<p>preset <b>{html.escape(str(summary.get('preset')))}</b>, rotation "
        f"{html.escape(str(summary.get('rotation', {}).get('offline')))}, "
        f"{summary.get('seconds', '?')} s, peak RSS {summary.get('peak_rss_mb', '?')} MB</p>",
        f"<table>{rows}</table>",
    ]
    for name, path in out.figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{name.replace('_', ' ')}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    if out.skipped:
        items = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in out.skipped.items())
        parts.append(f"<h2>not drawn</h2><ul>{items}</ul>")
    parts.append("</body></html>")
    with atomic_file(out.html) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")

"""``onnxq diff``: where a quantized model departs from float, and where the HTP departs from ONNX Runtime.

The float model is brought to the QDQ model's form (the same canonical rewrites and, from the QDQ
model's metadata, the same rotations), the QDQ model is read through a float view, and both are
searched for the same structural points (per layer: norm outputs, q/k/v, o_proj's input and
output, the residual stream after attention and after the MLP, down_proj's input and output; then
the final norm and the logits). Points are matched by structure, never by name. All three runs see
the same tokens: the float model and the QDQ model on ONNX Runtime CPU, and with ``ep="qnn"`` the
QDQ model on the QNN HTP backend.

Per point: SQNR in dB and relative error against float, the fraction of float values outside the
point's quantization range (clipping), and the HTP-vs-CPU error in units of the point's scale.

With ``ep="qnn"`` each op is also checked on its own (:func:`htp_ops`): the HTP's output codes of
every quantized tensor against the QDQ reference computing that op from the HTP's own input codes,
so a departure shows at the op that makes it, not smeared over everything after it.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core.errors import OnnxqError
from rewrites.qdq_view import strip_qdq
from rewrites.structure import Structure, StructureError, discover

#: a layer whose error grows this many times more than the median layer is where it "jumps"
JUMP_FACTOR = 3.0
#: points whose basis a learned rotation changes (not comparable to float then)
R2_KINDS = frozenset({"v", "attn_out"})
#: values in the residual stream's basis: a learned R1 (``--rotate learned``) is not rebuilt for the reference
R1_KINDS = frozenset({"attn_in", "o_out", "resid_attn", "mlp_in", "down_out", "resid_mlp", "embed", "head_in"})


@dataclass
class PointDiff:
    layer: int | None
    kind: str
    float_tensor: str
    qdq_tensor: str
    sqnr_db: float = math.nan
    rel_error: float = math.nan
    clipped: float = math.nan
    htp_steps: float | None = None


@dataclass
class OpDeparture:
    """How far the HTP's codes of one quantized tensor are from the reference op fed the HTP's inputs."""

    op: str
    node: str
    tensor: str
    bits: int
    mismatched: float  # fraction of codes that differ
    max_steps: int
    mean_steps: float


@dataclass
class DiffReport:
    points: list[PointDiff]
    windows: int
    ep: str
    local: dict[int, float] = field(default_factory=dict)  # layer -> error it adds on its own
    first_jump: dict[str, Any] | None = None
    most_clipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ops: list[OpDeparture] = field(default_factory=list)  # ep="qnn": worst first

    def layers(self) -> list[dict[str, Any]]:
        """One row per layer: SQNR of each point kind (and the worst HTP error)."""
        rows: dict[int, dict[str, Any]] = {}
        for p in self.points:
            key = -1 if p.layer is None else p.layer
            row = rows.setdefault(key, {"layer": p.layer})
            row[p.kind] = round(p.sqnr_db, 2)
            if p.htp_steps is not None:
                row["htp_steps"] = max(row.get("htp_steps", 0.0), round(p.htp_steps, 1))
        for layer, err in self.local.items():
            rows[layer]["local_rel_error"] = round(err, 5)
        return [rows[k] for k in sorted(rows, key=lambda k: (k < 0, k))]


def structural_points(s: Structure, g: ir.Graph) -> dict[tuple[int | None, str], str]:
    """(layer, kind) -> tensor name for every comparison point of a discovered structure."""
    nodes = {n.name: n for n in g}
    out: dict[tuple[int | None, str], str] = {}
    for layer in s.layers:
        i, a, m = layer.index, layer.attn, layer.mlp
        out[(i, "attn_in")] = layer.attn_norm.output
        out[(i, "q")], out[(i, "k")], out[(i, "v")] = a.q.value, a.k.value, a.v.value
        out[(i, "attn_out")] = nodes[a.o.node].inputs[0].name
        out[(i, "o_out")] = a.o.value
        out[(i, "resid_attn")] = nodes[layer.attn_residual].outputs[0].name
        out[(i, "mlp_in")] = layer.mlp_norm.output
        out[(i, "down_in")] = nodes[m.down.node].inputs[0].name
        out[(i, "down_out")] = m.down.value
        out[(i, "resid_mlp")] = nodes[layer.mlp_residual].outputs[0].name
    out[(None, "embed")] = nodes[s.embed_node].outputs[0].name
    out[(None, "head_in")] = s.final_norm.output
    out[(None, "logits")] = g.outputs[0].name
    return out


def _visible(value: ir.Value) -> ir.Value:
    """What consumers of ``value`` see in a QDQ graph: the DQ after its Q, if there is one."""
    for use in value.uses():
        if use.node.op_type == "QuantizeLinear":
            for dq_use in use.node.outputs[0].uses():
                if dq_use.node.op_type == "DequantizeLinear":
                    return dq_use.node.outputs[0]
    return value


def _encoding_of(value: ir.Value) -> tuple[float, float, float] | None:
    """(scale, lo, hi) of the per-tensor Q applied to ``value``."""
    for use in value.uses():
        q = use.node
        if q.op_type != "QuantizeLinear":
            continue
        scale = oir.const_array(q.inputs[1])
        zp_v = q.inputs[2] if len(q.inputs) > 2 else None
        zp = oir.const_array(zp_v) if zp_v is not None else np.zeros(())
        if scale is None or scale.size != 1 or zp is None:
            return None
        dtype = zp_v.const_value.dtype if zp_v is not None and zp_v.const_value is not None else ir.DataType.UINT8
        qmin, qmax = {
            ir.DataType.UINT8: (0, 255),
            ir.DataType.INT8: (-128, 127),
            ir.DataType.UINT16: (0, 65535),
            ir.DataType.INT16: (-32768, 32767),
        }.get(dtype, (0, 255))
        s, z = float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0])
        return s, (qmin - z) * s, (qmax - z) * s
    return None


def _with_outputs(model: ir.Model, values: list[ir.Value], path: Path) -> Path:
    for v in values:
        if not v.is_graph_output():
            model.graph.outputs.append(v)
    oir.save(model, path)
    return path


def diff(float_path: str | Path, qdq_path: str | Path, windows: np.ndarray, *, ep: str = "cpu") -> DiffReport:
    """Compare a QDQ model with its float model, point by point, on ``windows`` of token ids."""
    with tempfile.TemporaryDirectory(prefix="onnxq-diff-") as work:
        return _diff(float_path, qdq_path, windows, ep, Path(work))


def _diff(float_path: str | Path, qdq_path: str | Path, windows: np.ndarray, ep: str, work: Path) -> DiffReport:
    from onnxq.device.qnn import cpu_session, session
    from onnxq.stages.prepare import prepare

    if ep not in ("cpu", "qnn"):
        raise OnnxqError(f"unknown execution provider {ep!r}", "use --ep cpu or --ep qnn")
    qdq = oir.load(qdq_path)
    if not any(n.op_type == "DequantizeLinear" for n in qdq.graph.all_nodes()):
        raise OnnxqError(
            f"{qdq_path} is not a QDQ model (no DequantizeLinear)", "pass the float model first: onnxq diff FLOAT QDQ"
        )
    meta = qdq.metadata_props
    rotate = meta.get("onnxq.rotate", "none")
    online = [w for w in meta.get("onnxq.online", "").split(",") if w]
    seed = int(meta.get("onnxq.seed", "0"))
    learned = meta.get("onnxq.learned_rotation") == "true"
    notes = []
    seq = windows.shape[1]
    learned_r1 = rotate == "learned"  # the reference gets the Hadamard R1 under it; q/k/v, gate/up see no R1
    reference_rotation = "hadamard" if learned_r1 else rotate
    channels = {int(k): v for k, v in json.loads(meta.get("onnxq.outlier_channels") or "{}").items()}
    split = (lambda _m, _s: channels) if channels else None  # the main path's down_in, not the whole one
    ref = prepare(
        oir.load(float_path), seq_len=seq, rotate=reference_rotation, online=online, seed=seed, outliers=split
    ).model
    view = oir.load(qdq_path)
    strip_qdq(view)
    try:
        s_ref, s_q = discover(ref), discover(view)
    except StructureError as exc:
        raise OnnxqError(
            f"diff needs the transformer structure: {exc.problem}", "diff models onnxq can parse"
        ) from None
    p_ref, p_q = structural_points(s_ref, ref.graph), structural_points(s_q, view.graph)
    keys = [
        k for k in p_ref if k in p_q and not (learned and k[1] in R2_KINDS) and not (learned_r1 and k[1] in R1_KINDS)
    ]
    if learned:
        notes.append("learned R2: v and attn_out are in another basis than float and are not compared")
    if learned_r1:
        notes.append("learned R1: the residual stream, its norms and writers are in another basis and are not compared")
    if rotate != "none":
        notes.append(
            f"float reference rotated like the QDQ model ({rotate}, seed {seed}"
            + (f", online {','.join(online)}" if online else "")
            + (", the same outlier split)" if channels else ")")
        )
    ref_values = {v.name: v for n in ref.graph for v in n.outputs}
    ref_path = _with_outputs(ref, [ref_values[p_ref[k]] for k in keys], work / "float.onnx")
    q_values = {v.name: v for n in qdq.graph for v in n.outputs}
    targets = {k: q_values[p_q[k]] for k in keys if p_q[k] in q_values}
    if (None, "logits") in keys:
        targets[(None, "logits")] = qdq.graph.outputs[0]
    encodings = {k: _encoding_of(v) for k, v in targets.items()}
    visible = {k: _visible(v) for k, v in targets.items()}
    q_path = _with_outputs(qdq, list(visible.values()), work / "qdq.onnx")

    fs = cpu_session(ref_path)
    cs = cpu_session(q_path)
    hs = session(q_path) if ep == "qnn" else None
    f_names = [o.name for o in fs.get_outputs()]
    q_names = [o.name for o in cs.get_outputs()]
    import torch

    from calib.layers import layer_ranges
    from calib.mirror import Mirror

    mirror = Mirror(ref)
    ranges = layer_ranges(mirror, s_ref)
    local_acc = {i: [0.0, 0.0] for i in range(len(ranges))}
    acc = {k: np.zeros(4) for k in keys}  # Σx², Σ(x-q)², Σ|x|, Σ|x-q|
    clip = {k: [0.0, 0.0] for k in keys}
    htp = dict.fromkeys(keys, 0.0)
    for w in windows:
        ids = np.asarray(w, dtype=np.int64).reshape(1, -1)
        fo = dict(zip(f_names, fs.run(None, {"input_ids": ids}), strict=True))
        co = dict(zip(q_names, cs.run(None, {"input_ids": ids}), strict=True))
        ho = dict(zip(q_names, hs.run(None, {"input_ids": ids}), strict=True)) if hs is not None else None
        # each layer in float on the QDQ model's own input: the error that layer adds by itself
        for i, (first, last, inp, out) in enumerate(ranges):
            prev = (None, "embed") if i == 0 else (i - 1, "resid_mlp")
            if prev not in visible or (i, "resid_mlp") not in visible:
                continue
            x_in = torch.as_tensor(co[visible[prev].name])
            with torch.no_grad():
                y = mirror.run_steps(first, last, {inp: x_in}, want=out).numpy().astype(np.float64)
            got = co[visible[(i, "resid_mlp")].name].astype(np.float64)
            local_acc[i][0] += float(np.abs(got - y).sum())
            local_acc[i][1] += float(np.abs(y).sum())
        for k in keys:
            if k not in visible:
                continue
            x = fo[p_ref[k]].astype(np.float64)
            q = co[visible[k].name].astype(np.float64)
            if x.shape != q.shape:
                q = q.reshape(x.shape) if q.size == x.size else q
            if x.shape != q.shape:
                continue
            e = x - q
            acc[k] += [float((x * x).sum()), float((e * e).sum()), float(np.abs(x).sum()), float(np.abs(e).sum())]
            enc = encodings.get(k)
            if enc is not None:
                _, lo, hi = enc
                clip[k][0] += float(((x < lo) | (x > hi)).sum())
                clip[k][1] += x.size
            if ho is not None and enc is not None:
                h = ho[visible[k].name].astype(np.float64)
                htp[k] = max(htp[k], float(np.abs(h - q).max()) / enc[0])
    points = []
    for k in keys:
        if k not in visible:
            continue
        sx, se, ax, ae = acc[k]
        p = PointDiff(k[0], k[1], p_ref[k], p_q[k])
        p.sqnr_db = 10 * math.log10(sx / se) if se > 0 else math.inf
        p.rel_error = ae / ax if ax > 0 else math.nan
        p.clipped = clip[k][0] / clip[k][1] if clip[k][1] else math.nan
        p.htp_steps = htp[k] if ep == "qnn" and encodings.get(k) is not None else None
        points.append(p)
    del fs, cs, hs
    report = DiffReport(points, len(windows), ep, notes=notes)
    if ep == "qnn":
        report.ops = htp_ops(qdq_path, windows[:1])
    report.local = {i: a / b for i, (a, b) in local_acc.items() if b > 0}
    report.first_jump = _first_jump(report.local, points)
    ranked = sorted((p for p in points if not math.isnan(p.clipped)), key=lambda p: -p.clipped)
    report.most_clipped = [
        {"layer": p.layer, "kind": p.kind, "tensor": p.qdq_tensor, "clipped": p.clipped}
        for p in ranked[:5]
        if p.clipped > 0
    ]
    return report


def htp_ops(qdq_path: str | Path, ids: np.ndarray) -> list[OpDeparture]:
    """Every activation quantizer's codes on the HTP against the QDQ reference op fed the HTP's inputs.

    One HTP run records every quantized tensor; then a copy of the graph whose quantized tensors
    are all graph inputs runs on ONNX Runtime CPU (basic optimisations: the QDQ semantics), fed the
    HTP's codes, so each op computes from exactly what the HTP gave it. Worst first, in 8-bit steps.
    """
    with tempfile.TemporaryDirectory(prefix="onnxq-ops-") as work:
        return _htp_ops(qdq_path, ids, Path(work))


def _htp_ops(qdq_path: str | Path, ids: np.ndarray, work: Path) -> list[OpDeparture]:
    from onnxq.device.qnn import cpu_session, session

    def codes(model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if n.op_type == "QuantizeLinear" and not oir.is_const(n.inputs[0])]

    model = oir.load(qdq_path)
    quantizers = codes(model)
    names = [q.outputs[0].name for q in quantizers]
    for q in quantizers:
        if not q.outputs[0].is_graph_output():
            model.graph.outputs.append(q.outputs[0])
    oir.save(model, work / "htp.onnx")
    feed = {"input_ids": np.asarray(ids, dtype=np.int64).reshape(1, -1)}
    sess = session(work / "htp.onnx")
    htp = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    del sess
    model = oir.load(qdq_path)
    producers = {}
    for q in codes(model):
        value = q.outputs[0]
        producers[value.name] = q.inputs[0].producer()
        fed = ir.Value(name=f"{value.name}.htp", type=value.type, shape=value.shape)
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, fed)
        model.graph.inputs.append(fed)
        if not value.is_graph_output():
            model.graph.outputs.append(value)
    oir.save(model, work / "ref.onnx")
    sess = cpu_session(work / "ref.onnx", optimized=False)
    feed.update({i.name: htp[i.name.removesuffix(".htp")] for i in sess.get_inputs() if i.name.endswith(".htp")})
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    out = []
    for name in names:
        h, r = htp[name], ref[name]
        d = np.abs(h.astype(np.int64) - r.astype(np.int64))
        node = producers[name]
        out.append(
            OpDeparture(
                node.op_type if node is not None else "input",
                node.name if node is not None else "",
                name,
                8 * h.dtype.itemsize,
                float((d > 0).mean()),
                int(d.max()),
                float(d.mean()),
            )
        )
    return sorted(out, key=lambda o: -o.mean_steps / 2 ** (o.bits - 8))  # in 8-bit steps


def _first_jump(local: dict[int, float], points: list[PointDiff]) -> dict[str, Any] | None:
    """The first layer that adds far more error on its own than the layers usually do.

    Each layer's own error is measured by running it in float on the QDQ model's input to it, so a
    fault shows wherever it is, not smeared over the layers after it.
    """
    if not local:
        return None
    typical = float(np.median(list(local.values())))
    for layer in sorted(local):
        if local[layer] >= max(JUMP_FACTOR * typical, 0.01):
            sqnr = next((round(p.sqnr_db, 2) for p in points if p.kind == "resid_mlp" and p.layer == layer), None)
            return {
                "layer": layer,
                "local_rel_error": round(local[layer], 4),
                "typical": round(typical, 4),
                "sqnr_db": sqnr,
            }
    return None

"""Decide what gets quantized and how, before any number is computed.

A :class:`QuantPlan` is data: a list of quantization *points*. A point is one quantizer (one scale
and zero point) shared by every tensor that must carry the same encoding on the HTP: an op's output
and everything that only moves it (Reshape, Transpose, Slice, Expand, Gather, Concat inputs and
output). Constants that meet activations in elementwise ops (RoPE tables, the mask, eps) are
points too; MatMul weights are per-channel weight points.

The HTP's rules are applied here, once:

- the second input of a MatMul between two activations is signed and symmetric; an FC cannot
  emit a signed output, so an FC feeding such an input gets a DQ→Q convert into it;
- a per-channel FullyConnected runs at one width: its output takes its input's width;
- a fused RMSNorm (QNN RmsNorm) emits 16 bits; an FC that reads it at 8 bits reads a *convert
  point*, a requantized copy with its own range, shared by all FCs reading that norm; so does
  down_proj reading the run-time Hadamard R4, which runs at 16 bits on the 16-bit SwiGLU product
  (rotating an already 8-bit input would only spread its rounding error);
- an 8-bit per-channel weight next to an 8-bit activation uses integers in ±63 (beyond that the
  HTP's results are wrong: 12 % error on a 576x64 FC, measured on the QNN EP);
- an op reading the 8-bit output of a 4-bit LPBQ FC on the HTP sees a value one step too high in
  about a fifth of the elements (those whose code minus zero point is a multiple of 4), though
  the FC reports the right codes; a Convert reads them right. So every compute op reads an LPBQ
  FC's 8-bit output through a convert to 16 bits on the same grid (code x 257: exact);
- an op that reads 8 bits and writes 16 is computed by the HTP to about 8-bit precision, and an
  RmsNorm that does so is refused outright (Qwen3's q_norm and k_norm). So such an op reads its
  8-bit input through a convert to 16 bits on the same grid;
- a 16-bit Sigmoid or Softmax output is written by the HTP on its own grid, step 1/65536 from 0,
  whatever encoding the graph gives it (ONNX Runtime's QNN quantizer sets the same); those
  points get that encoding instead of a calibrated one.

Every DQ→Q pair between two widths becomes a QNN Convert.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.ir import const_array, is_const
from onnxq.core.presets import Preset
from onnxq.core.qtypes import QType, QuantSpec
from onnxq.core.recipes import Recipe
from rewrites.rotate import ONLINE_KEY
from rewrites.structure import DATA_MOVEMENT, Role, Structure, as_linear

log = logging.getLogger(__name__)

MAP_VERSION = 1
HTP_PER_CHANNEL_LIMIT = 63
#: ops whose output the HTP produces at 16 bits only (QNN RmsNorm/LayerNorm reject 8-bit outputs)
HTP_16BIT_OUTPUT = frozenset({"SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"})
FORCED_WHY = "htp: norm output is 16-bit"
OUTLIER_WHY = "outlier channels"
CACHE_WHY = "kv cache"
NORM_OUTPUTS = frozenset({"attn_in", "mlp_in", "head_in"})
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
#: ops whose 16-bit output the HTP writes on a fixed grid: [0, 1) in steps of 1/65536
HTP_FIXED_16BIT_OUTPUT = frozenset({"Sigmoid", "Softmax"})
UNIT_RANGE_16 = (0.0, 65535 / 65536)
#: FullyConnected output roles and the input role whose width they follow
FOLLOWS = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o_out": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down_out": "down_in",
    "logits": "head_in",
}


@dataclass(frozen=True)
class Point:
    """One quantizer and everything that shares it."""

    name: str
    kind: str  # "act", "const", "weight" or "convert" (a requantized copy of ``source``)
    spec: QuantSpec
    role: Role
    tensors: tuple[str, ...] = ()  # activations carrying this encoding
    consts: tuple[str, ...] = ()  # float initializers quantized with it
    roots: tuple[str, ...] = ()  # activations whose values define the range
    why: str = "preset"
    source: str | None = None  # convert points: the tensor they requantize
    fixed_range: tuple[float, float] | None = None  # set by the HTP, not calibrated

    @property
    def bits(self) -> int:
        return self.spec.bits


@dataclass(frozen=True)
class Convert:
    """Requantize ``tensor`` on the edge into input ``index`` of node ``consumer`` (a QNN Convert).

    The new encoding is point ``point``'s, re-expressed in ``spec`` when one is given.
    """

    point: str
    tensor: str
    consumer: str
    index: int
    spec: QuantSpec | None = None


@dataclass
class QuantPlan:
    preset: Preset
    points: dict[str, Point]
    converts: list[Convert] = field(default_factory=list)
    structure: Structure | None = None

    def act_points(self) -> list[Point]:
        """Points whose range comes from calibration (activations and converts of them)."""
        return [p for p in self.points.values() if p.kind in ("act", "convert")]

    def weight_points(self) -> list[Point]:
        return [p for p in self.points.values() if p.kind == "weight"]

    def has_blocked_weights(self) -> bool:
        """Whether any weight has per-block scales (LPBQ), which AIMET's 0.6.1 encodings cannot hold."""
        return any(p.spec.block_size for p in self.weight_points())

    def point_of(self) -> dict[str, str]:
        """tensor/initializer name -> point name"""
        out = {}
        for p in self.points.values():
            for t in (*p.tensors, *p.consts):
                out[t] = p.name
        return out

    def counts(self) -> dict[str, int]:
        acts = [p for p in self.points.values() if p.kind == "act"]
        return {
            "activation points": len(acts),
            "int16 activations": sum(p.bits == 16 for p in acts),
            "int8 activations": sum(p.bits == 8 for p in acts),
            "weights int8": sum(p.bits == 8 for p in self.weight_points()),
            "weights int4": sum(p.bits == 4 for p in self.weight_points()),
            "weights int4 per block": sum(p.bits == 4 and p.spec.block_size > 0 for p in self.weight_points()),
            "constants": sum(p.kind == "const" for p in self.points.values()),
            "converts": len({(c.point, c.tensor) for c in self.converts}),
        }

    # ------------------------------------------------------------------ precision map I/O
    def precision_map(self) -> dict[str, Any]:
        """The editable map: every point with its width, role and why it has that width."""
        entries = {}
        for p in self.points.values():
            entry: dict[str, Any] = {
                "kind": p.kind,
                "role": p.role.kind,
                "bits": p.bits,
                "dtype": p.spec.qtype.value,
                "why": p.why,
            }
            if p.role.layer is not None:
                entry["layer"] = p.role.layer
            entries[p.name] = entry
        return {"version": MAP_VERSION, "preset": self.preset.name, "points": entries}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra  # keep the earlier (producer-side) root as representative


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def _dynamic_matmul(node: ir.Node) -> bool:
    return node.op_type == "MatMul" and all(v is not None and not is_const(v) for v in node.inputs[:2])


def act_width(role: Role, preset: Preset, recipe: Recipe, *, fc_input: bool = False) -> tuple[int, str]:
    """Activation width for a role under a preset, and why.

    Norm outputs (``attn_in``, ``mlp_in``, ``head_in``) are kept at 16 bits as tensors, but the FCs
    that read them (``fc_input``) take the preset's width unless the recipe keeps the role at 16.
    """
    if preset.act_bits >= 16:
        return 16, "preset"
    if role.kind == "outliers":  # the point of the split (rewrites.outliers): they need the width
        return 16, OUTLIER_WHY
    kind = FOLLOWS.get(role.kind, role.kind)
    if kind in recipe.kept16:
        return 16, "kept16"
    del fc_input  # same answer today; kept so recipes can treat FC inputs apart later
    return preset.act_bits, "preset"


def build_plan(
    model: ir.Model,
    preset: Preset,
    recipe: Recipe,
    roles: Mapping[str, Role],
    structure: Structure | None = None,
    overrides: Mapping[str, int] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> QuantPlan:
    """Plan the quantization of a canonical float model (see :mod:`rewrites.canonical`).

    Args:
        roles: role of every node output (from :func:`rewrites.structure.tensor_roles`, or generic).
        overrides: point name -> bits, from a user's precision map.
    """
    graph = model.graph
    overrides = dict(overrides or {})
    pinned: set[str] = set()  # points whose width the map changes (an unchanged entry may follow its FC)
    uf = _UnionFind()
    order: dict[str, int] = {}
    roots: set[str] = set()
    const_members: set[str] = set()
    weights: dict[str, tuple[ir.Node, int]] = {}  # weight initializer -> (linear node, channel axis)
    symmetric: set[str] = set()

    for value in graph.inputs:
        if _is_float(value):
            uf.find(value.name)
            roots.add(value.name)
            order[value.name] = -1
    forced16 = {o.name for n in graph if n.op_type in HTP_16BIT_OUTPUT for o in n.outputs}
    kv_inputs = {v.name for v in graph.inputs if (v.name or "").startswith(("past_key", "past_value"))}
    for i, node in enumerate(graph):
        lin = as_linear(node)
        if lin is not None:
            b = node.inputs[1]
            assert b is not None
            if not b.is_initializer():
                raise OnnxqError(
                    f"MatMul {node.name!r} reads its weight through {b.producer().op_type}",
                    "run the canonical rewrites first (onnxq quantize does)",
                )
            axis = 0 if lin.transposed else 1
            weights[b.name] = (node, axis)
        if _dynamic_matmul(node):
            symmetric.add(node.inputs[1].name)
        outs = [o for o in node.outputs if _is_float(o)]
        for o in outs:
            order[o.name] = i
            uf.find(o.name)
        moves = node.op_type in DATA_MOVEMENT and node.domain == ""
        if moves:
            data_inputs = node.inputs[:1] if node.op_type != "Concat" else node.inputs
            for src in data_inputs:
                if not _is_float(src):
                    continue
                assert src is not None
                if src.is_initializer() or is_const(src):
                    const_members.add(src.name)
                for o in outs:
                    uf.union(src.name, o.name)
            continue
        for o in outs:
            roots.add(o.name)
        for idx, src in enumerate(node.inputs):
            if not _is_float(src) or src is None:
                continue
            if lin is not None and idx == 1:
                continue  # weights are planned per channel below
            if lin is not None and idx == 2:
                raise OnnxqError(
                    f"linear {node.name!r} has a bias input", "fold biases into an Add (not supported yet)"
                )
            if is_const(src):
                const_members.add(src.name)
                uf.find(src.name)

    # Group members by representative.
    groups: dict[str, list[str]] = {}
    for name in list(uf.parent):
        groups.setdefault(uf.find(name), []).append(name)

    # A FullyConnected cannot emit a signed symmetric output on the HTP (measured): a symmetric
    # group fed by an FC output gets that output as its own point plus a convert into the group.
    linear_outputs = {n.outputs[0].name for n in graph if as_linear(n) is not None}
    split: dict[str, list[str]] = {}
    extra_roots: dict[str, list[str]] = {}  # symmetric group key -> FC outputs that define its range
    split_edges: list[str] = []
    for members in groups.values():
        fc_outs = [m for m in members if m in linear_outputs]
        if not any(m in symmetric for m in members) or not fc_outs or len(members) == 1:
            split[members[0]] = members
            continue
        rest = [m for m in members if m not in fc_outs]
        split[rest[0]] = rest
        extra_roots[rest[0]] = fc_outs
        for m in fc_outs:
            split[m] = [m]
            split_edges.append(m)
    groups = split

    points: dict[str, Point] = {}
    for rep, members in groups.items():
        acts = [m for m in members if m not in const_members]
        consts = tuple(sorted(m for m in members if m in const_members))
        group_roots = sorted((m for m in acts if m in roots), key=lambda m: order.get(m, 0))
        if acts:
            first = min(acts, key=lambda m: order.get(m, 0))
            name = group_roots[0] if group_roots else first
            group_roots += extra_roots.get(rep, [])
            # a group named after a graph input (a KV cache) takes the role of the op that feeds it
            role = roles.get(name) or next((roles[r] for r in group_roots if r in roles), Role("other"))
            kind = "act"
        else:
            name = consts[0]
            kind = "const"
            user = _first_user_role(graph, name, roles)
            role = Role("const", user.layer)
        sym = any(m in symmetric for m in members)
        if kind == "const":
            bits, why = _const_width(graph, name, roles, preset, recipe)
        elif any(m in forced16 for m in group_roots):
            bits, why = 16, FORCED_WHY
        else:
            bits, why = act_width(role, preset, recipe)
            if any(m in kv_inputs for m in members):  # the cache's width, whatever the role's
                bits, why = min(bits, recipe.kv_cache_bits), CACHE_WHY
        if name in overrides:
            wanted = overrides.pop(name)
            if wanted != bits and why == FORCED_WHY:
                raise OnnxqError(
                    f"precision map: {name!r} is a norm output, which the HTP produces at 16 bits",
                    f"set the width its FCs read in {name + '.fc_in'!r} instead",
                )
            if wanted != bits:
                bits, why = wanted, (reasons or {}).get(name, "user")
                pinned.add(name)
            elif reasons and name in reasons:  # held where it is, for a reason (a KV cache)
                why = reasons[name]
        spec = QuantSpec(QType.for_bits(bits, signed=sym), symmetric=sym)
        if sym and why == "preset":
            why = "preset (symmetric: 2nd MatMul input)"
        points[name] = Point(
            name, kind, spec, role, tuple(sorted(acts, key=lambda m: order.get(m, 0))), consts, tuple(group_roots), why
        )

    point_of = {t: p.name for p in points.values() for t in (*p.tensors, *p.consts)}
    converts: list[Convert] = []
    fc_in_bits = _plan_fc_inputs(
        graph, points, point_of, roles, preset, recipe, overrides, dict(reasons or {}), converts
    )
    _follow_fc_widths(graph, points, point_of, fc_in_bits, pinned)

    for wname, (node, axis) in weights.items():
        role = roles.get(node.outputs[0].name, Role("other"))
        bits = recipe.lm_head_weight_bits if role.kind == "logits" else preset.weight_bits
        why = "lm_head" if role.kind == "logits" and bits != preset.weight_bits else "preset"
        if role.kind == "outliers" and bits < 8:  # k rows of down_proj, next to a 16-bit input
            bits, why = 8, OUTLIER_WHY
        if node.metadata_props.get("onnxq.online_rotation") and bits < 8:  # exact for ±1/√n Hadamards,
            bits, why = 8, "run-time rotation"  # not for the dense random fallback at 4 bits
        if wname in overrides:
            wanted = overrides.pop(wname)
            if wanted != bits:
                bits, why = wanted, (reasons or {}).get(wname, "user")
        limit = HTP_PER_CHANNEL_LIMIT if bits == 8 and fc_in_bits[node.name] == 8 else None
        spec = QuantSpec(QType.for_bits(bits, signed=True), symmetric=True, axis=axis, limit=limit)
        rows = _input_rows(node, axis)
        block = recipe.weight_block
        if bits == 4 and block and rows > 0 and rows % block == 0:  # LPBQ: blocks along the input rows
            spec = QuantSpec(spec.qtype, symmetric=True, axis=1 - axis, block_size=block)
        points[wname] = Point(wname, "weight", spec, Role("weight", role.layer), consts=(wname,), why=why)

    if overrides:
        unknown = ", ".join(sorted(overrides)[:5])
        raise OnnxqError(
            f"precision map names points this model does not have: {unknown}",
            "write a fresh map with `onnxq quantize` and edit that one",
        )
    for fc_out in split_edges:
        value = next(n.outputs[0] for n in graph if n.outputs and n.outputs[0].name == fc_out)
        for use in value.uses():
            target = point_of.get(use.node.outputs[0].name) if use.node.outputs else None
            if target is not None and points[target].spec.symmetric:
                converts.append(Convert(target, fc_out, use.node.name, use.idx))
    converts += _widen_8bit_reads(graph, points, point_of, weights, converts)
    _fix_htp_grids(graph, points)
    plan = QuantPlan(preset, points, converts, structure)
    log.info("plan: %s", plan.counts())
    return plan


def _widen_8bit_reads(
    graph: ir.Graph,
    points: Mapping[str, Point],
    point_of: Mapping[str, str],
    weights: Mapping[str, tuple[ir.Node, int]],
    converts: list[Convert],
) -> list[Convert]:
    """Converts to 16 bits (same grid) on the edges where a compute op reads an 8-bit activation:
    every reader of an LPBQ FC's output, and every reader that writes 16 bits (not a MatMul) of any."""
    values = {v.name: v for v in graph.inputs} | {o.name: o for n in graph for o in n.outputs}
    taken = {(c.consumer, c.index) for c in converts}
    lpbq = {point_of[node.outputs[0].name] for w, (node, _) in weights.items() if points[w].spec.block_size}
    out: list[Convert] = []
    for point in points.values():
        if point.kind != "act" or point.bits != 8:
            continue
        wide = QuantSpec(QType.for_bits(16, signed=point.spec.qtype.signed), symmetric=point.spec.symmetric)
        for tensor in point.tensors:
            for use in values[tensor].uses():
                reader = use.node
                if reader.op_type in DATA_MOVEMENT and _stays_in(reader, point, point_of):
                    continue
                if (reader.name, use.idx) in taken:
                    continue
                written = point_of.get(reader.outputs[0].name) if reader.outputs else None
                widens = written is not None and points[written].bits == 16 and reader.op_type != "MatMul"
                if point.name in lpbq or widens:
                    out.append(Convert(point.name, tensor, reader.name, use.idx, wide))
    return out


def _fix_htp_grids(graph: ir.Graph, points: dict[str, Point]) -> None:
    """16-bit unsigned Sigmoid and Softmax outputs take the grid the HTP writes them on."""
    fixed = {o.name for n in graph if n.op_type in HTP_FIXED_16BIT_OUTPUT for o in n.outputs}
    for name, point in list(points.items()):
        if point.kind == "act" and point.roots and set(point.roots) <= fixed and point.spec.qtype == QType.UINT16:
            points[name] = replace(point, fixed_range=UNIT_RANGE_16)


def _stays_in(node: ir.Node, point: Point, point_of: Mapping[str, str]) -> bool:
    return all(point_of.get(o.name) == point.name for o in node.outputs)


def _input_rows(node: ir.Node, channel_axis: int) -> int:
    """How many input rows (the reduced dimension) a linear's 2-D weight has."""
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    shape = weight.const_value.shape
    return int(shape[1 - channel_axis]) if len(shape) == 2 else 0


def _plan_fc_inputs(
    graph: ir.Graph,
    points: dict[str, Point],
    point_of: dict[str, str],
    roles: Mapping[str, Role],
    preset: Preset,
    recipe: Recipe,
    overrides: dict[str, int],
    reasons: dict[str, str],
    converts: list[Convert],
) -> dict[str, int]:
    """The width each FC reads its input at; norm outputs (fixed at 16 bits) get convert points."""
    fc_bits: dict[str, int] = {}
    for node in graph:
        if as_linear(node) is None:
            continue
        src = node.inputs[0]
        assert src is not None
        source = points[point_of[src.name]]
        side = roles.get(node.outputs[0].name, Role("other")).kind == "outliers"  # reads the norm at 16 bits
        producer = src.producer()
        rotated = producer is not None and producer.metadata_props.get(ONLINE_KEY) == "r4"
        if (source.why != FORCED_WHY and not rotated) or side:
            fc_bits[node.name] = source.bits
            continue
        name = f"{src.name}.fc_in"
        if name not in points:
            role = roles.get(src.name, Role("other"))
            bits, why = act_width(role, preset, recipe, fc_input=True)
            if name in overrides:
                wanted = overrides.pop(name)
                if wanted != bits:
                    bits, why = wanted, reasons.get(name, "user")
            spec = QuantSpec(QType.for_bits(bits, signed=False))
            points[name] = Point(name, "convert", spec, role, roots=source.roots, why=why, source=src.name)
        conv = points[name]
        fc_bits[node.name] = conv.bits
        # R4's output takes the width R4 reads at (see _follow_fc_widths, which runs after this)
        source_bits = fc_bits.get(producer.name, source.bits) if rotated and producer is not None else source.bits
        if conv.bits != source_bits:
            converts.append(Convert(name, src.name, node.name, 0))
    return fc_bits


def _follow_fc_widths(
    graph: ir.Graph, points: dict[str, Point], point_of: dict[str, str], fc_bits: Mapping[str, int], pinned: set[str]
) -> None:
    """An FC's output takes the width it reads its input at (the HTP runs a per-channel FC at one width)."""
    for node in graph:
        if node.name not in fc_bits:
            continue
        out_point = points[point_of[node.outputs[0].name]]
        bits = fc_bits[node.name]
        if out_point.bits == bits:
            continue
        if out_point.name in pinned:
            raise OnnxqError(
                f"precision map: FC {node.name!r} would read {bits}-bit and write {out_point.bits}-bit",
                "the HTP runs a per-channel FC at one width: give its input and output the same bits",
            )
        qtype = QType.for_bits(bits, signed=out_point.spec.qtype.signed)
        points[out_point.name] = replace(
            out_point, spec=replace(out_point.spec, qtype=qtype), why=f"follows FC input ({bits}-bit)"
        )


def _first_user_role(graph: ir.Graph, name: str, roles: Mapping[str, Role]) -> Role:
    value = graph.initializers.get(name)
    if value is None:
        return Role("other")
    for use in value.uses():
        for out in use.node.outputs:
            if out.name in roles:
                return roles[out.name]
    return Role("other")


def _const_width(
    graph: ir.Graph, name: str, roles: Mapping[str, Role], preset: Preset, recipe: Recipe
) -> tuple[int, str]:
    """A constant takes the width of the op it feeds: 16 bits unless that op's output is 8-bit."""
    arr = const_array(graph.initializers.get(name))
    user = _first_user_role(graph, name, roles)
    bits, _ = act_width(user, preset, recipe)
    if arr is not None and arr.size == 1:
        return 8, "scalar constant"  # any scalar is exact at 8 bits: the range is [min(0,v), max(0,v)]
    return bits, "follows its op"


# ---------------------------------------------------------------------- precision maps on disk
def read_precision_map(path: str | Path) -> dict[str, int]:
    """Load a map written by ``onnxq quantize``; returns point -> bits (validated)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnnxqError(f"precision map {path} does not exist", "check the path") from None
    except json.JSONDecodeError as exc:
        raise OnnxqError(f"precision map {path} is not valid JSON (line {exc.lineno})", "fix the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxqError(f"cannot read precision map {path} ({type(exc).__name__})", "pass a JSON file") from None
    if not isinstance(data, dict) or data.get("version") != MAP_VERSION or not isinstance(data.get("points"), dict):
        raise OnnxqError(
            f"{path} is not an onnxq precision map (version {MAP_VERSION} with 'points')",
            "start from the precision_map.json that `onnxq quantize` writes",
        )
    out = {}
    for name, entry in data["points"].items():
        if not isinstance(entry, dict) or "bits" not in entry:
            raise OnnxqError(f"precision map entry {name!r} has no 'bits'", 'write e.g. {"bits": 16}')
        bits = entry["bits"]
        kind = entry.get("kind", "act")
        allowed = (4, 8) if kind == "weight" else (8, 16)
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise OnnxqError(
                f"precision map: {name!r} has bits {bits!r}, a {type(bits).__name__}, not a number",
                f'write the width as a JSON number, e.g. "bits": {allowed[-1]} (no quotes)',
            )
        if bits not in allowed:
            raise OnnxqError(
                f"precision map: {name!r} asks for {bits}-bit {kind}", f"use {' or '.join(map(str, allowed))} bits"
            )
        out[name] = int(bits)
    return out

"""Give another graph of the same model the quantization of the scoring graph.

The prefill and decode graphs of ``onnxq export --kv-cache`` are traced from other code than the
scoring graph, so their tensors carry other names; their ops are the same. Each quantization point
is therefore named by where it sits in the model, not by its tensor:

- a point with a computing producer, by that op: its layer, its role, its op type, and its rank
  among the layer's ops of that role and type;
- a point that only carries an operand (an input, a constant, a weight, a cache, the mask, a RoPE
  table gathered at run time or folded), by the first op that computes with it and the input slot;
- a convert point, by the tensor it requantizes.

A layer's KV cache point (its cache input, the Concat and the new entries) is keyed by the new
entries' op, so the cache takes the encoding the scoring graph gives the keys after RoPE and the
values. The follower then takes the scoring run's widths, encodings and weights (rounded, learned
or rotated as they were) point by point; only its RoPE table keeps its own length.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from onnxq.core.errors import OnnxqError
from onnxq.core.presets import Preset
from onnxq.core.qtypes import Encoding
from onnxq.core.recipes import Recipe
from onnxq.plan import CACHE_WHY, QuantPlan, build_plan
from onnxq.stages.prepare import Prepared
from rewrites.structure import DATA_MOVEMENT, Role

Key = tuple[object, ...]
#: what to do when the graphs do not match
REEXPORT = "export the scoring graph and the KV-cache graphs of one model in one run: onnxq export --kv-cache"


def _node_keys(graph: ir.Graph, roles: Mapping[str, Role]) -> dict[str, Key]:
    """Computing node -> (layer, role, op type, rank among the layer's nodes of that role and type)."""
    seen: dict[tuple[object, ...], int] = {}
    keys: dict[str, Key] = {}
    for node in graph:
        if node.op_type in DATA_MOVEMENT or not node.outputs:
            continue
        role = roles.get(node.outputs[0].name, Role("other"))
        head = (role.layer, role.kind, node.op_type)
        keys[node.name] = (*head, seen.get(head, 0))
        seen[head] = seen.get(head, 0) + 1
    return keys


class _Keys:
    """Structural keys of one prepared graph's tensors and points."""

    def __init__(self, model: ir.Model, roles: Mapping[str, Role]) -> None:
        graph = model.graph
        self.nodes = _node_keys(graph, roles)
        self.values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
        self.values.update(dict(graph.initializers.items()))
        self.values.update({o.name: o for n in graph for o in n.outputs})
        self.order = {n.name: i for i, n in enumerate(graph)}

    def produced(self, tensor: str) -> Key | None:
        producer = self.values[tensor].producer()
        return self.nodes.get(producer.name) if producer is not None else None

    def first_use(self, tensor: str) -> tuple[int, Key, int] | None:
        """(graph order, key, slot) of the first computing op reading ``tensor``, through data movement."""
        best = None
        for use in self.values[tensor].uses():
            node = use.node
            if node.name in self.nodes:
                found = (self.order[node.name], self.nodes[node.name], use.idx)
            elif node.outputs:
                found = self.first_use(node.outputs[0].name)
            else:
                found = None
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        return best

    def tensor(self, tensor: str) -> Key:
        made = self.produced(tensor)
        if made is not None:
            return ("out", made)
        use = self.first_use(tensor)
        if use is None:
            raise OnnxqError(f"tensor {tensor!r} is neither computed nor read", REEXPORT)
        return ("in", use[1], use[2])

    def point(self, plan: QuantPlan, name: str) -> Key:
        p = plan.points[name]
        if p.kind == "convert":
            assert p.source is not None
            return ("convert", self.tensor(p.source))
        for t in p.tensors:  # in graph order: the first computed tensor names the point
            made = self.produced(t)
            if made is not None:
                return ("out", made)
        uses = [u for u in (self.first_use(t) for t in (*p.tensors, *p.consts)) if u is not None]
        if not uses:
            raise OnnxqError(f"quantization point {name!r} is not read by any op", REEXPORT)
        _, node, slot = min(uses, key=lambda u: u[0])
        return ("in", node, slot)


def point_keys(keys: _Keys, plan: QuantPlan) -> dict[Key, str]:
    """Structural key -> point name, for every point of ``plan`` (keys are unique, checked)."""
    out: dict[Key, str] = {}
    for name in plan.points:
        key = keys.point(plan, name)
        if key in out:
            raise OnnxqError(f"quantization points {out[key]!r} and {name!r} sit at the same place", REEXPORT)
        out[key] = name
    return out


def _leading_names(follower: _Keys, first: QuantPlan, leader: _Keys, leader_plan: QuantPlan) -> dict[str, str]:
    """Follower point -> leader point; every follower point has one, placed by the structure."""
    leading = point_keys(leader, leader_plan)
    mine = point_keys(follower, first)
    missing = [name for key, name in mine.items() if key not in leading]
    if missing:
        raise OnnxqError(
            f"the scoring graph has no quantization point where {missing[0]!r} sits"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            REEXPORT,
        )
    ranked = [name for key, name in mine.items() if _by_rank_alone(key)]
    if ranked:
        raise OnnxqError(f"point {ranked[0]!r} sits outside the transformer's structure", REEXPORT)
    return {name: leading[key] for key, name in mine.items()}


def _by_rank_alone(key: Key) -> bool:
    """Whether ``key`` names its op by its rank among unplaced ops, which other graphs may order otherwise."""
    node = key[1]
    return isinstance(node, tuple) and node[:2] == (None, "other")


def cache_widths(follower: Prepared, leader: Prepared, preset: Preset, recipe: Recipe) -> dict[str, int]:
    """Leader point -> width, for the points that hold the follower's KV cache (the cache's width)."""
    first = build_plan(follower.model, preset, recipe, follower.roles, follower.structure)
    leader_plan = build_plan(leader.model, preset, recipe, leader.roles, leader.structure)
    keys = _Keys(follower.model, follower.roles), _Keys(leader.model, leader.roles)
    names = _leading_names(keys[0], first, keys[1], leader_plan)
    return {names[n]: p.bits for n, p in first.points.items() if p.why == CACHE_WHY}


def follow(
    follower: Prepared, leader: Prepared, plan: QuantPlan, encodings: Mapping[str, Encoding], recipe: Recipe
) -> tuple[QuantPlan, dict[str, Encoding]]:
    """Quantize ``follower`` (prepared as ``leader`` was) with the leader's widths, encodings and weights.

    The leader's model must still hold float weights (call this before emitting its quantizers).
    """
    first = build_plan(follower.model, plan.preset, recipe, follower.roles, follower.structure)
    mine_keys, leader_keys = _Keys(follower.model, follower.roles), _Keys(leader.model, leader.roles)
    names = _leading_names(mine_keys, first, leader_keys, plan)
    widths = {n: plan.points[lead].bits for n, lead in names.items()}
    reasons = {n: plan.points[lead].why for n, lead in names.items()}
    mine = build_plan(follower.model, plan.preset, recipe, follower.roles, follower.structure, widths, reasons)
    out: dict[str, Encoding] = {}
    inits = follower.model.graph.initializers
    for name, point in mine.points.items():
        lead = plan.points[names[name]]
        if point.spec != lead.spec:
            raise OnnxqError(
                f"point {name!r} is {point.spec.qtype.value} here but {lead.spec.qtype.value} in the scoring graph",
                REEXPORT,
            )
        out[name] = encodings[lead.name]
        theirs = {leader_keys.tensor(c): c for c in lead.consts}
        for const in point.consts:  # each constant by where it is read, not by its name
            source = theirs.get(mine_keys.tensor(const))
            value = leader.model.graph.initializers[source].const_value if source is not None else None
            own = inits[const].const_value
            assert own is not None
            if value is not None and tuple(value.shape) == tuple(own.shape):
                inits[const].const_value = value  # rounded, learned or rotated as the leader's
            elif point.kind == "weight":
                raise OnnxqError(f"weight {const!r} has no counterpart of its shape in the scoring graph", REEXPORT)
    return mine, out

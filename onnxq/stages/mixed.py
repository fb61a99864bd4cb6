"""Sensitivity-guided mixed precision: which 8-bit activations to promote to 16 bits, under a budget.

Candidates are the 8-bit inputs of MatMuls (what an ``a8`` preset puts at 8 bits): the FC inputs
(norm outputs through their convert, o_proj's and down_proj's inputs) and the operands of the
attention MatMuls. Promoting one makes its FC run at 16 bits (the HTP runs a per-channel FC at one
width), so the cost of a promotion is the MACs that move from 8x8 to 16x8.

Weights are candidates too: a 4-bit weight promoted to 8 bits (``--weight-budget``), costing its
extra bytes (``--budget-by macs``: its parameter count, which is also its MACs per token).

Selection is greedy on score per unit of cost until the budget is spent; the budget is either a
fraction of the candidates (``--budget 0.1``) or of the candidates' MACs (``--budget 0.1
--budget-by macs``).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxq.core import recipes
from onnxq.core.errors import OnnxqError
from onnxq.core.qtypes import Encoding
from onnxq.plan import Point, QuantPlan, build_plan
from onnxq.stages.prepare import Prepared, Progress
from rewrites.structure import as_linear

if TYPE_CHECKING:
    from calib.qsim import QuantSim

#: roles of 8-bit activations that feed MatMuls
CANDIDATE_ROLES = frozenset({"attn_in", "mlp_in", "attn_out", "down_in", "q_rope", "k_rope", "v"})
SELECTORS = ("fisher", "measured", "relative", "random")


@dataclass(frozen=True)
class Choice:
    promoted: tuple[str, ...]
    scores: dict[str, float]
    costs: dict[str, float]
    selector: str
    budget: float
    by: str


def candidates(plan: QuantPlan, model: ir.Model) -> list[Point]:
    """8-bit activation (and convert) points that feed a MatMul and can change width on their own.

    An FC's output is not a candidate: it takes the width its FC reads the input at.
    """
    fc_outputs = {n.outputs[0].name for n in model.graph if as_linear(n) is not None}
    return [
        p
        for p in plan.act_points()
        if p.bits == 8 and p.role.kind in CANDIDATE_ROLES and not fc_outputs.intersection(p.tensors)
    ]


def weight_candidates(plan: QuantPlan) -> list[Point]:
    """4-bit weights, each of which can go to 8 bits on its own (its FC keeps its activation width)."""
    return [p for p in plan.weight_points() if p.bits == 4]


def weight_edges(model: ir.Model, points: list[Point]) -> dict[str, tuple[str, str]]:
    """weight point -> (input, output) tensor of the FC that reads it."""
    wanted = {c: p.name for p in points for c in p.consts}
    edges = {}
    for node in model.graph:
        lin = as_linear(node)
        if lin is not None and node.inputs[1] is not None and node.inputs[1].name in wanted:
            edges[wanted[node.inputs[1].name]] = (node.inputs[0].name, node.outputs[0].name)
    return edges


def weight_sizes(model: ir.Model, points: list[Point]) -> dict[str, float]:
    """Parameters per weight point: the bytes a 4 -> 8 bit promotion adds, times two."""
    sizes = {}
    for p in points:
        value = model.graph.initializers.get(p.consts[0]) if p.consts else None
        shape = value.shape if value is not None else None
        sizes[p.name] = float(np.prod([int(d) for d in shape])) if shape is not None else 1.0
    return sizes


def macs(model: ir.Model, plan: QuantPlan) -> dict[str, float]:
    """MACs per token of the MatMuls each candidate feeds (its HTP cost when promoted)."""
    point_of = plan.point_of()
    reads: dict[str, float] = {}
    for node in model.graph:
        if node.op_type != "MatMul":
            continue
        lin = as_linear(node)
        shape = node.inputs[1].shape if lin is not None else node.outputs[0].shape
        if shape is None:
            continue
        dims = [int(d) for d in shape if isinstance(d, int)]
        work = float(dims[-2] * dims[-1]) if lin is not None else float(dims[-1] * (dims[-2] if len(dims) > 1 else 1))
        src = node.inputs[0].name
        converted = [c.point for c in plan.converts if c.consumer == node.name]
        for name in converted or [point_of.get(src, "")]:
            if name:
                reads[name] = reads.get(name, 0.0) + work
    return reads


def choose(
    cands: list[Point],
    scores: Mapping[str, float],
    costs: Mapping[str, float],
    budget: float,
    *,
    by: str = "count",
    selector: str = "fisher",
    seed: int = 0,
) -> Choice:
    """Greedy selection of points to promote within ``budget`` (a fraction in [0, 1])."""
    if not 0.0 <= budget <= 1.0:
        raise OnnxqError(f"--budget {budget} is not a fraction", "pass a value between 0 and 1, e.g. 0.1")
    if by not in ("count", "macs"):
        raise OnnxqError(f"--budget-by {by!r} is unknown", "use count or macs")
    names = [p.name for p in cands]
    weight = {n: (1.0 if by == "count" else max(costs.get(n, 0.0), 1.0)) for n in names}
    total = sum(weight.values())
    if selector == "random":
        order = names[:]
        random.Random(seed).shuffle(order)
    else:
        order = sorted(names, key=lambda n: scores.get(n, 0.0) / weight[n], reverse=True)
    chosen, spent = [], 0.0
    for n in order:
        if spent + weight[n] <= budget * total + 1e-9:
            chosen.append(n)
            spent += weight[n]
    return Choice(tuple(chosen), dict(scores), dict(costs), selector, budget, by)


def choose_precision(
    model: ir.Model,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    windows: Any,
    *,
    budget: float | None,
    weight_budget: float | None = None,
    by: str,
    selector: str,
    seed: int,
    overrides: dict[str, int] | None,
    recipe: recipes.Recipe,
    prepared: Prepared,
    progress: Progress | None = None,
    held: Collection[str] = (),
) -> tuple[QuantPlan, dict[str, Any]]:
    """Score the 8-bit MatMul inputs (and 4-bit weights), promote the best within the budgets, re-plan.

    ``held``: points whose width is not the budget's to change (a KV cache's). Returns the new plan
    and the summary's ``mixed_precision`` record.
    """
    from calib.qsim import QuantSim
    from calib.sensitivity import measured_gain, relative_and_fisher

    if selector not in SELECTORS:
        raise OnnxqError(f"unknown selector {selector!r}", f"use one of: {', '.join(SELECTORS)}")
    acts = [p for p in candidates(plan, model) if p.name not in held] if budget is not None else []
    wts = weight_candidates(plan) if weight_budget is not None else []
    scores: dict[str, float] = {}
    if (acts or wts) and selector != "random":
        sim = QuantSim(model, plan, encodings, frozen=True)
        tick = progress("sensitivity", len(windows)) if progress else None
        edges = weight_edges(model, wts)
        both = relative_and_fisher(sim, acts, windows, progress=tick, weights=edges, head=_head(sim, model, prepared))
        scores = {n: (rel if selector == "relative" else fis) for n, (rel, fis) in both.items()}
        if selector == "measured" and acts:
            assert budget is not None
            top = sorted(acts, key=lambda p: -scores[p.name])[: max(8, int(len(acts) * budget * 2) + 1)]
            tick = progress("measuring", len(top)) if progress else None
            gains = measured_gain(sim, top, windows, progress=tick)
            scores.update({p.name: gains.get(p.name, 0.0) for p in acts})
    promoted: dict[str, int] = {}
    record: dict[str, Any] = {"selector": selector, "by": by}
    if budget is not None:
        choice = choose(acts, scores, macs(model, plan), budget, by=by, selector=selector, seed=seed)
        promoted.update(dict.fromkeys(choice.promoted, 16))
        record.update(budget=budget, promoted=list(choice.promoted), scores=_rounded(scores, acts))
    if weight_budget is not None:
        sizes = weight_sizes(model, wts)
        wchoice = choose(wts, scores, sizes, weight_budget, by=by, selector=selector, seed=seed)
        promoted.update(dict.fromkeys(wchoice.promoted, 8))
        record.update(
            weight_budget=weight_budget, promoted_weights=list(wchoice.promoted), weight_scores=_rounded(scores, wts)
        )
    reasons = {**{n: plan.points[n].why for n in held}, **dict.fromkeys(promoted, f"promoted ({selector})")}
    merged = {**(overrides or {}), **promoted}
    new_plan = build_plan(model, plan.preset, recipe, prepared.roles, prepared.structure, merged, reasons)
    return new_plan, record


def _head(sim: QuantSim, model: ir.Model, prepared: Prepared) -> tuple[int, str, int] | None:
    """The steps after the last decoder layer, for the sensitivity pass to run in token chunks: (first
    step, the residual stream they read, the logits' width); None where they cannot be told apart."""
    from calib.layers import head_range, standing_layers

    width = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape else None
    ranges = standing_layers(sim.mirror, prepared.structure)
    head = head_range(sim.mirror, ranges) if ranges is not None and isinstance(width, int) else None
    return None if head is None else (*head, width)


def _rounded(scores: dict[str, float], points: list[Any]) -> dict[str, float]:
    """Scores of ``points``, highest first, to 4 significant digits (for summary.json)."""
    mine = {p.name: scores.get(p.name, 0.0) for p in points}
    return {k: float(f"{v:.4g}") for k, v in sorted(mine.items(), key=lambda kv: -kv[1])}

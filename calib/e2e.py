"""Learning end to end (stage 3 of ``--learn``): the model's own objective, on the rounded model.

After GPTQ has fixed every weight's integer codes, the ranges that stay free are trained jointly
against the float model's next-token distribution (KL on the logits), with every quantizer on, so
each window runs through the quantized model's own inputs, as MobileQuant's end-to-end stage does.
What is trained, by group (:data:`~onnxq.core.options.E2E_GROUPS`, ``--e2e-groups``):

- ``ranges``: the static ranges of the activations the MatMuls and the attention read;
- ``down_in``: down_proj's inputs (after R4, or with their outlier channels split off);
- ``side``: the outlier channels' 16-bit side path;
- ``kv``: the K and V projections' outputs (the cache the decode graph keeps);
- ``scales``: each weight's step per output channel, with its integer codes held (for LPBQ the
  channel's float scale, the 4-bit block multipliers held), as EfficientQAT's end-to-end stage does;
- ``rounding``: each 4-bit weight's rounding, on top of GPTQ's codes, as SignRound learns it: a
  value ``V`` per element in [-0.5, 0.5], added to where GPTQ's last rounding target lay from the
  code, moved by ``1 / e2e_steps`` against its gradient's sign each step; a code moves to its other
  neighbour once the sum crosses a half. The forward pass always runs the rounded codes.

The backward pass is checkpointed in segments (about one per decoder layer, as the sensitivity pass):
a forward pass without a graph keeps what crosses into each segment, and each segment is recomputed
with gradients, last first. The float model's targets are its top :data:`TOP_K` probabilities per
token and the rest's total, so a 152k vocabulary costs what a 49k one does.

A guard holds out calibration windows: the result is kept only when its next-token NLL there is
lower than the model's before this stage.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from calib.qsim import QuantSim
from onnxq.core import memory
from onnxq.core.options import LearnConfig
from onnxq.core.qtypes import Encoding, lpbq
from onnxq.plan import Point, QuantPlan

log = logging.getLogger(__name__)

#: float probabilities kept per token as the target (the rest go into one bucket)
TOP_K = 128
#: checkpoint segments of the backward pass (about one per decoder layer on a 30-layer model)
SEGMENTS = 32


@dataclass(frozen=True)
class Targets:
    """The float model's next-token distribution on one window: its top-k log-probabilities and the rest."""

    index: torch.Tensor  # [tokens, k] int64
    logp: torch.Tensor  # [tokens, k]
    rest: torch.Tensor  # [tokens]: log of the probability outside the top k


@dataclass
class EndToEndResult:
    encodings: dict[str, Encoding]
    weights: dict[str, np.ndarray]  # weights whose step changed: their new float values, on the new grid
    kept: bool  # False: the guard found it worse on the held-out windows, and nothing changed
    heldout_before: float
    heldout_after: float
    history: list[float] = field(default_factory=list)  # the loss of each step
    seconds: float = 0.0
    trained: dict[str, int] = field(default_factory=dict)  # group -> points trained


def group_of(point: Point) -> str | None:
    """The group (of :data:`~onnxq.core.options.E2E_GROUPS`) a point is trained under; None: it stays as it is."""
    if point.kind == "weight":
        return "scales"
    if point.kind not in ("act", "convert") or point.fixed_range is not None:
        return None
    kind = point.role.kind
    if kind == "outliers":
        return "side"
    if kind in ("k", "v"):
        return "kv"
    if kind in ("down_in", "down_out"):
        return "down_in"
    if kind in ("embed", "logits"):
        return None  # the embedding's range covers its table; the logits' only rescale the output
    return "ranges"


def target_of(logits: torch.Tensor) -> Targets:
    """The float model's target on one window, from its logits (those calibration computes)."""
    with torch.inference_mode(False), torch.no_grad():  # training reads these: no inference tensors
        logp = torch.log_softmax(logits.clone().reshape(-1, logits.shape[-1]).float(), dim=-1)
        top, index = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
        return Targets(index, top.clone(), rest)


def kl_to(target: Targets, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(float || quantized), on the float top k and the bucket of the rest."""
    logq = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    top = logq.gather(-1, target.index)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    p = target.logp.exp()
    kl = (p * (target.logp - top)).sum(-1) + target.rest.exp() * (target.rest - rest)
    return kl.mean()


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    flat = logits.reshape(-1, logits.shape[-1])[:-1].float()
    return float(torch.nn.functional.cross_entropy(flat, ids.reshape(-1)[1:]))


class CodeScale(torch.nn.Module):
    """A weight as its integer codes times its step, with a learnable factor per output channel; with
    ``fraction`` (where its rounding target lay from each code, in steps), its rounding learned too,
    by ``lr`` per step (the ``rounding`` group)."""

    def __init__(
        self, codes: np.ndarray, encoding: Encoding, fraction: np.ndarray | None = None, lr: float = 0.0
    ) -> None:
        super().__init__()
        spec = encoding.spec
        assert spec.axis is not None and spec.qmin >= -128 and spec.qmax <= 127
        self.encoding0 = encoding
        self.register_buffer("codes", torch.as_tensor(codes.astype(np.int8)))
        self.rounds = fraction is not None
        if fraction is not None:  # one byte for the fraction (in 254ths of a step), two for V (in lr's)
            fraction = np.rint(np.clip(fraction, -0.5, 0.5) * 254).astype(np.int8)
            self.register_buffer("fraction", torch.as_tensor(fraction))
            self.register_buffer("votes", torch.zeros(codes.shape, dtype=torch.int16))
            self.lr = lr
            self.reach = math.ceil(0.5 / lr)
        self.axis = spec.axis % codes.ndim
        self.register_buffer("scale", torch.as_tensor(np.asarray(encoding.scale, dtype=np.float32)))
        channel = spec.channel_axis if spec.block_size else self.axis
        self.channels = [-1 if d == channel else 1 for d in range(codes.ndim)]
        self.t = torch.nn.Parameter(torch.zeros(codes.shape[channel], dtype=torch.float32), requires_grad=False)

    def steps(self) -> torch.Tensor:
        """The step of every channel (or block), shaped like the encoding's scale."""
        return self.scale * torch.exp(self.t).reshape(self.channels)

    @property
    def learned(self) -> bool:
        return self.rounds or self.t.requires_grad

    def current(self) -> torch.Tensor:
        """The codes: GPTQ's, each moved to its other neighbour where fraction + V crossed a half."""
        if not self.rounds:
            return self.codes
        moved = self.fraction.float().div_(254).add_(self.votes.float().mul_(self.lr)).round_()
        spec = self.encoding0.spec
        return moved.add_(self.codes).clamp_(spec.qmin, spec.qmax).to(torch.int8)

    def vote(self, grad: torch.Tensor) -> None:
        """SignRound's step: V moves by lr against the sign of the gradient (that of the codes' too)."""
        self.votes.sub_(torch.sign(grad).to(torch.int16)).clamp_(-self.reach, self.reach)

    def forward(self) -> torch.Tensor:
        block = self.encoding0.spec.block_size
        codes = self.current()
        if not block:
            return codes.float() * self.steps().reshape([-1 if d == self.axis else 1 for d in range(codes.dim())])
        rows = codes.movedim(self.axis, 0)  # blocks along the first axis
        steps = self.steps().movedim(self.axis, 0)
        blocks = rows.reshape(rows.shape[0] // block, block, -1).float() * steps.unsqueeze(1)
        return blocks.reshape(rows.shape).movedim(0, self.axis)

    def written(self) -> tuple[Encoding, np.ndarray]:
        """The encoding with the learned steps (float32, as DequantizeLinear computes), and the weight on it."""
        enc, spec = self.encoding0, self.encoding0.spec
        factor = torch.exp(self.t.detach()).double().numpy()
        if spec.block_size:
            assert enc.channel_scale is not None
            new = lpbq(spec, enc.block_ints, (enc.channel_scale.astype(np.float64) * factor).astype(np.float32))
        else:
            scale = (np.asarray(enc.scale, np.float64) * factor.reshape(np.shape(enc.scale))).astype(np.float32)
            new = Encoding(spec, scale, np.zeros(scale.shape, np.int64))
        return new, new.dequantize(self.current().numpy())


class EndToEnd:
    """The quantized model in the torch mirror, its free ranges trainable, run in checkpointed segments."""

    def __init__(
        self,
        model: ir.Model,
        plan: QuantPlan,
        encodings: Mapping[str, Encoding],
        groups: tuple[str, ...],
        *,
        places: Mapping[str, np.ndarray] | None = None,
        rounds: int = 1,
    ):
        """``places``: where GPTQ's last rounding target of each element lay from its code, in steps
        (the ``rounding`` group starts from them); a weight not there was rounded to nearest.
        ``rounds``: the optimiser steps the ``rounding`` group's V takes (each moves it by ``1 / rounds``)."""
        self.sim = QuantSim(model, plan, encodings)
        self.sim.requires_grad_(False)
        self.mirror = self.sim.mirror
        self.trained: dict[str, int] = {}
        self.params: list[torch.nn.Parameter] = []
        self.weights: dict[str, CodeScale] = {}
        self.acts: list[str] = []
        for point in plan.points.values():
            group = group_of(point)
            learned = group is not None and group in groups
            if point.kind == "weight":  # every weight as its codes times its steps, as the QDQ model has it
                enc = encodings[point.name]
                base = self.sim.base.pop(point.name).numpy()
                codes = enc.quantize(base)
                fraction = None
                if "rounding" in groups and point.bits <= 4:
                    given = (places or {}).get(point.name)
                    fraction = enc.unrounded(base) - codes if given is None else given
                    self.trained["rounding"] = self.trained.get("rounding", 0) + 1
                self.weights[point.name] = CodeScale(codes, enc, fraction, 1 / max(rounds, 1))
                self.weights[point.name].t.requires_grad_(learned)
            if not learned:
                continue
            self.trained[group] = self.trained.get(group, 0) + 1
            if point.kind == "weight":
                self.params.append(self.weights[point.name].t)
            else:
                act = self.sim.act(point.name)
                for p in (act.t_lo, act.t_hi):
                    p.requires_grad_(True)
                    self.params.append(p)
                self.acts.append(point.name)
        self.refresh()
        steps = self.mirror.steps
        self.cuts = self.mirror.segments(SEGMENTS)
        self.reads = [
            sorted({n for step in steps[first:last] for n in step.inputs if n in self.weights})
            for first, last in self.mirror.spans(self.cuts)
        ]
        self.readers = {n: sum(n in reads for reads in self.reads) for n in self.weights}

    def refresh(self) -> None:
        """The weights' current values, without gradients (what a forward pass reads)."""
        with torch.no_grad():
            for name, w in self.weights.items():
                self.mirror.consts[name] = w()

    def logits(self, ids: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.mirror.run(self.mirror.window(ids), tap=self.sim.tap)[self.mirror.output_names[0]]

    def heldout_nll(self, windows: np.ndarray) -> float:
        return float(np.mean([_nll(self.logits(w), torch.as_tensor(w)) for w in windows]))

    def backward(self, ids: np.ndarray, target: Targets) -> float:
        """KL of one window; its gradient accumulates into the trained parameters."""
        mirror, tap = self.mirror, self.sim.tap
        saved = mirror.checkpoint(mirror.window(ids)[mirror.input_names[0]], self.cuts, tap)
        losses: list[float] = []

        def kl(values: dict[str, torch.Tensor]) -> torch.Tensor:
            loss = kl_to(target, values[mirror.output_names[0]])
            losses.append(loss.item())
            return loss

        upstream: dict[str, torch.Tensor] = {}  # d loss / d value, summed over the segments done
        rounding: dict[str, torch.Tensor] = {}  # d loss / d weight of the rounding group, summed likewise
        left = dict(self.readers)
        segments = list(zip(mirror.spans(self.cuts), saved, self.reads, strict=True))
        for (first, last), start, reads in reversed(segments):
            values = {name: self.weights[name]() for name in reads if self.weights[name].learned}
            for name, value in values.items():  # the rounding group's gradient is the weight's own
                mirror.consts[name] = value.detach().requires_grad_(True) if self.weights[name].rounds else value
            final = kl if last == len(mirror.steps) else None
            for k, grad in mirror.backward_range(first, last, start, upstream, tap, final).items():
                upstream[k] = upstream[k] + grad if k in upstream else grad
            for name, value in values.items():
                leaf, w = mirror.consts[name], self.weights[name]
                if w.rounds and leaf.grad is not None:
                    if value.requires_grad:
                        value.backward(leaf.grad)
                    rounding[name] = rounding[name] + leaf.grad if name in rounding else leaf.grad
                left[name] -= 1
                if name in rounding and not left[name]:  # its last reader: the whole window's gradient
                    w.vote(rounding.pop(name))
            for name in reads:
                mirror.consts[name] = mirror.consts[name].detach()
        return losses[0]

    def written(self) -> tuple[dict[str, Encoding], dict[str, np.ndarray]]:
        """The trained points' encodings, and the weights whose steps were trained (on their new grid)."""
        encodings = {name: self.sim.act(name).encoding() for name in self.acts}
        weights: dict[str, np.ndarray] = {}
        for name, w in self.weights.items():
            if w.learned:
                encodings[name], weights[name] = w.written()
        return encodings, weights


def finetune(
    model: ir.Model,
    plan: QuantPlan,
    encodings: Mapping[str, Encoding],
    train: np.ndarray,
    targets: list[Targets],
    heldout: np.ndarray,
    *,
    config: LearnConfig,
    places: Mapping[str, np.ndarray] | None = None,
    progress: Callable[..., None] | None = None,
) -> EndToEndResult:
    """Train the free ranges of ``model`` (its weights already rounded) against ``targets`` on ``train``;
    ``places``: as :class:`EndToEnd` takes them.

    Returns the encodings and weights to write back, or, where the held-out NLL did not fall, the
    ones given (``kept`` False).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    e2e = EndToEnd(model, plan, encodings, config.e2e_groups, places=places, rounds=config.e2e_steps)
    before = e2e.heldout_nll(heldout)
    opt = torch.optim.Adam(e2e.params, lr=config.e2e_lr) if e2e.params else None
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    for _ in range(config.e2e_steps):
        j = int(torch.randint(len(train), (1,), generator=gen))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = e2e.backward(train[j], targets[j])
        if opt is not None:
            opt.step()
        e2e.refresh()
        history.append(round(loss, 6))
        memory.trim()
        if progress is not None:
            progress(1, f"KL {loss:.4g}")
    after = e2e.heldout_nll(heldout)
    kept = after < before
    learned, weights = e2e.written() if kept else ({}, {})
    log.info("end to end: held-out NLL %.4f -> %.4f (%s)", before, after, "kept" if kept else "discarded")
    return EndToEndResult(
        {**encodings, **learned},
        weights,
        kept,
        before,
        after,
        history,
        time.perf_counter() - start,
        dict(e2e.trained),
    )

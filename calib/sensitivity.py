"""How much each quantized tensor hurts, measured two ways on calibration windows.

- ``relative``: Quant.npu's score, ``Σ|q(x) - x| / Σ|x|`` of the tensor at its low width, alone.
- ``fisher``: the end-to-end effect on the model's loss of quantizing the tensor at its low
  width, to second order: ``½ Σ_tokens (Σ_channels ∂L/∂x · (q(x) - x))²``, from one backward
  pass of the fully quantized model per window (Fisher approximation of the loss Hessian).
- ``measured`` refines the best candidates of ``fisher`` by the exact change of the calibration
  loss when that tensor alone is promoted to 16 bits in the quantized model.

Weights (4-bit candidates for 8 bits) get the same two scores: ``relative`` on the weight itself,
and ``fisher`` on the error the rounded weight adds to its FC's output, token by token:
``½ Σ_t (∂L/∂y_t · x_t ΔW)²`` with ``x_t`` the (quantized) input the FC reads.

The loss is the next-token NLL of the calibration text under the quantized model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from calib.qsim import QuantSim
from onnxq.core import memory
from onnxq.plan import Point

#: checkpoint segments of the backward pass (about one per decoder layer on a 30-layer model): only
#: one segment's activations are held at a time, instead of the whole graph's
SEGMENTS = 32
#: logits of up to this many bytes go through the head's backward in one piece. Past it (a 128k
#: vocabulary), the logits, their quantizer's and the loss's temporaries and gradients, each of the
#: logits' size, are the pass's peak, so the tokens go in chunks of :data:`LOGIT_CHUNK` bytes instead
#: (each chunk reads the head's weights again, which is why small logits stay whole)
LOGIT_BYTES = 2**27
LOGIT_CHUNK = 2**25

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sensitivity:
    point: str
    relative: float
    fisher: float
    measured: float | None = None

    @property
    def score(self) -> float:
        return self.measured if self.measured is not None else self.fisher


def _nll(logits: torch.Tensor, ids: torch.Tensor, tokens: slice | None = None) -> torch.Tensor:
    """Mean next-token NLL of the window ``ids``; with ``tokens``, the share of it of the logits of those
    positions (the shares add up to the mean)."""
    if tokens is None:
        logits = logits.reshape(-1, logits.shape[-1])[:-1].float()
        return torch.nn.functional.cross_entropy(logits, ids.reshape(-1)[1:])
    predicted = ids.shape[-1] - 1
    rows = max(0, min(tokens.stop, predicted) - tokens.start)
    logits = logits.reshape(-1, logits.shape[-1])[:rows].float()
    targets = ids.reshape(-1)[tokens.start + 1 : tokens.start + 1 + rows]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / predicted


#: ops that compute each token from that token alone, given constants without a token axis
TOKENWISE = frozenset(
    {"SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization", "MatMul", "Add", "Sub", "Mul", "Div"}
    | {"Cast", "Identity", "Neg", "Sqrt", "Reciprocal", "Tanh", "QuantizeLinear", "DequantizeLinear"}
)


def _tokenwise(sim: QuantSim, first: int, edges: Mapping[str, tuple[str, str]]) -> bool:
    """Whether steps ``first`` on can run over the tokens in chunks: token-wise ops, every MatMul's
    second operand a weight, no constant of three dimensions or more (a per-position table), and every
    scored FC there reading its input there too."""
    mirror = sim.mirror
    steps = mirror.steps[first:]
    produced = {name for step in steps for name in step.outputs}
    for step in steps:
        consts = [n for n in step.inputs if n is not None and n in mirror.consts]
        if step.op_type not in TOKENWISE or any(mirror.consts[n].dim() > 2 for n in consts):
            return False
        if step.op_type == "MatMul" and step.inputs[1] not in consts:
            return False
    return all(i in produced for i, o in edges.values() if o in produced)


def relative_and_fisher(
    sim: QuantSim,
    candidates: Sequence[Point],
    windows: np.ndarray,
    progress: Callable[[int], None] | None = None,
    weights: Mapping[str, tuple[str, str]] | None = None,
    segments: int | None = None,
    head: tuple[int, str, int] | None = None,
) -> dict[str, tuple[float, float]]:
    """Both scores for every candidate, with every quantizer of ``sim`` (a frozen one) on.

    ``weights`` maps weight points to score to the (input, output) tensors of the FC reading them.
    The backward pass is checkpointed into about ``segments`` pieces (default :data:`SEGMENTS`; 1: the
    whole graph at once). ``head``: (first step, residual stream read, width of the logits) of the steps
    after the last decoder layer; where they work token by token (:func:`_tokenwise`) and the logits
    exceed :data:`LOGIT_BYTES`, their backward goes over the tokens in chunks of :data:`LOGIT_CHUNK` bytes.
    """
    if not sim.frozen:
        raise ValueError("the sensitivity pass reads a frozen QuantSim")
    roots = {r: p.name for p in candidates for r in p.roots}
    names = {p.name for p in candidates}
    edges = dict(weights or {})
    fc_in: dict[str, list[str]] = {}
    for w, (i, _) in edges.items():
        fc_in.setdefault(i, []).append(w)
    fc_out = {o: w for w, (_, o) in edges.items()}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    out_grads: dict[str, torch.Tensor] = {}
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    pending: dict[str, list[torch.Tensor]] = {}  # per-token terms of a point, summed over its roots
    err_abs = dict.fromkeys(names, 0.0)
    ref_abs = dict.fromkeys(names, 0.0)
    fisher = dict.fromkeys([*names, *edges], 0.0)

    def tap(name: str, value: torch.Tensor) -> torch.Tensor | None:
        given = value
        if value.is_floating_point() and not value.requires_grad:  # a float made from ids (the embedding):
            value = value.detach().requires_grad_()  # frozen quantizers carry no gradient, so it starts here
        point = roots.get(name)
        if name in fc_out and value.requires_grad:  # the FC output's gradient (its quantizer's STE passes it)
            value.retain_grad()
            outputs[fc_out[name]] = value
        out = value
        for q in sim.taps.get(name, ()):
            if q == point:  # the candidate: keep what its quantizer adds, with a handle for the gradient
                quant = sim.act(q)(out.detach())
                error = (quant - out).detach()
                err_abs[q] += float(error.abs().sum())
                ref_abs[q] += float(out.detach().abs().sum())
                out = out + error
                out.retain_grad()
                captured.append((q, out, error))
            else:
                out = sim.act(q)(out)
        if name in fc_in:
            for w in fc_in[name]:
                inputs[w] = out.detach()
        return None if out is given else out

    def delta(w: str) -> torch.Tensor:
        """What rounding adds to weight ``w`` (computed where it is used, not held for every weight)."""
        return (sim.mirror.const(w) - sim.effective_weight(w)).float()

    def collect() -> list[tuple[str, torch.Tensor]]:
        """Fold the gradients one backward produced into the scores; returns the candidates' per-token
        terms, in the order of their roots."""
        terms = [
            (q, (value.grad * error).reshape(-1, value.shape[-1]).sum(-1))
            for q, value, error in captured
            if value.grad is not None
        ]
        captured.clear()
        out_grads.update({q: v.grad for q, v in outputs.items() if v.grad is not None})
        outputs.clear()
        for q in [q for q in out_grads if q in inputs]:  # an FC's input and output may sit in two segments
            with torch.no_grad():
                grad = out_grads.pop(q)
                per_token = (grad * (inputs.pop(q) @ delta(q))).reshape(-1, grad.shape[-1]).sum(-1)
            fisher[q] += 0.5 * float((per_token**2).sum())
        return terms

    mirror = sim.mirror
    cuts = mirror.segments(segments or SEGMENTS)
    head_spans: list[slice | None] = [None]  # the head's tokens, chunk by chunk
    tokens = np.shape(windows)[-1]
    if head is not None and tokens * 4 * head[2] > LOGIT_BYTES and _tokenwise(sim, head[0], edges):
        head_spans = [*memory.slices(tokens, 4 * head[2], LOGIT_CHUNK)]
    if len(head_spans) > 1:  # the head: a segment of its own, entered by the residual stream alone
        cuts = [cut for cut in cuts if cut[0] < head[0]] + [(head[0], (head[1],))]

    def head_nll(ids: torch.Tensor, span: slice | None, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return _nll(values[mirror.output_names[0]], ids, span)

    for w in windows:
        ids = torch.as_tensor(np.asarray(w, dtype=np.int64)).reshape(1, -1)
        saved = mirror.checkpoint(ids, cuts, sim.tap)
        # backward segment by segment, last first, recomputing each from its saved inputs
        upstream: dict[str, torch.Tensor] = {}  # dL/d(value) summed over the segments read so far
        for (first, last), start in reversed(list(zip(mirror.spans(cuts), saved, strict=True))):
            spans = head_spans if len(head_spans) > 1 and head is not None and first == head[0] else [None]
            grads: dict[str, list[torch.Tensor]] = {}
            parts = []
            for span in spans:
                part = start if span is None else {k: v[:, span] for k, v in start.items()}
                loss = partial(head_nll, ids, span) if last == len(mirror.steps) else None
                for k, grad in mirror.backward_range(first, last, part, upstream, tap, loss).items():
                    grads.setdefault(k, []).append(grad)
                parts.append(collect())
            for k, chunks in grads.items():  # the chunks of the tokens, in order
                grad = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
                upstream[k] = upstream[k] + grad if k in upstream else grad
            for i, (q, _) in enumerate(parts[0]):  # each root's per-token terms, the chunks joined
                pending.setdefault(q, []).append(torch.cat([part[i][1] for part in parts]))
            memory.trim()  # else each segment's freed temporaries stay resident: +1.9 GB over 32 on SmolLM2
        for q, terms in pending.items():  # a point's roots (in one segment or several) add up per token
            same = all(t.shape == terms[0].shape for t in terms)
            fisher[q] += 0.5 * float((sum(terms) ** 2).sum() if same else sum((t**2).sum() for t in terms))
        pending.clear()
        inputs.clear()
        out_grads.clear()
        if progress is not None:
            progress(1)
    scores = {n: (err_abs[n] / max(ref_abs[n], 1e-12), fisher[n] / len(windows)) for n in names}
    with torch.no_grad():
        for q in edges:
            base = sim.effective_weight(q).detach()
            scores[q] = (float(delta(q).abs().sum() / base.abs().sum().clamp_min(1e-12)), fisher[q] / len(windows))
    return scores


def measured_gain(
    sim: QuantSim,
    candidates: Sequence[Point],
    windows: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Exact drop of calibration NLL when each candidate alone is run in float (≈ at 16 bits)."""
    if not sim.frozen:
        raise ValueError("the sensitivity pass reads a frozen QuantSim")
    feed = sim.mirror.input_names[0]

    def loss() -> float:
        total = 0.0
        with torch.no_grad():
            for w in windows:
                ids = torch.as_tensor(np.asarray(w, dtype=np.int64)).reshape(1, -1)
                total += float(_nll(sim.mirror.run({feed: ids}, tap=sim.tap)[sim.mirror.output_names[0]], ids))
        return total / len(windows)

    base = loss()
    gains = {}
    for p in candidates:
        sim.act(p.name).enabled = False
        gains[p.name] = base - loss()
        sim.act(p.name).enabled = True
        if progress is not None:
            progress(1)
    return gains

"""Learn the residual-stream rotation R1 on top of the Hadamard one (Cayley parametrisation).

R1 is shared by every layer: each linear that reads the stream sees ``x R1`` and ``R1ᵀ W``, each
that writes it ``W R1``. Stage 1 of :mod:`calib.learn` goes layer by layer, so it cannot move a
rotation all layers share; R1 is learned first, on its own, before anything is calibrated.

Objective: the relative output error of the stream's linears with their inputs and weights
quantized at the preset's widths, ``‖q(x Q) q(Qᵀ W) − x W‖² / ‖x W‖²`` for q/k/v/gate/up and
``‖x q(W Q) − x W Q‖² / ‖x W Q‖²`` for o/down, on float inputs captured once (a few hundred
tokens), with ``Q = cayley(G)`` and Adam on G. Quantizers are round-to-nearest with min/max
ranges, so the objective does not depend on encodings that R1 would invalidate. A step rotates
the weights of a few random layers (rotating all 30 costs ~4.5 GFLOP each); the full objective
is measured before and after, and Q is dropped if it did not lower it. lm_head (49k columns, 8-bit
weights, its input at 16 bits) is left out of the objective, not out of the rotation.

Measured on SmolLM2 W4A8 (split, R4, LPBQ 16, GPTQ + sweeps; Hadamard R1: 32.24 on WikiText-2):
the default 60 steps lower the objective by 6 % and give 32.25; 100 steps at 5x the rate lower it
by 22 % and give 32.61. An option, not a default: GPTQ removes the weight error it mostly learns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from calib.fakequant import round_ste
from calib.learn import cayley
from calib.mirror import Mirror
from rewrites.structure import Linear, Structure

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Widths:
    """What the stream's linears are quantized to (from the preset and the recipe)."""

    act_bits: int
    weight_bits: int
    weight_block: int = 0  # rows per weight scale block; 0: one scale per output channel


@dataclass(frozen=True)
class R1Result:
    rotation: np.ndarray  # hidden x hidden, orthogonal; identity when learning did not help
    before: float
    after: float
    kept: bool
    seconds: float


def _fq_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=1e-12)
    zp = torch.round(-lo / scale).detach()
    return (torch.clamp(round_ste(x / scale) + zp, 0, 2**bits - 1) - zp) * scale


def _fq_weight(w: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Symmetric, per output channel of ``w [in, out]``, or per block of ``block`` input rows."""
    qmax = 2 ** (bits - 1) - 1
    if block and w.shape[0] % block == 0:
        amax = w.reshape(w.shape[0] // block, block, -1).abs().amax(dim=1).repeat_interleave(block, dim=0)
    else:
        amax = w.abs().amax(dim=0, keepdim=True)
    scale = torch.clamp(amax / qmax, min=1e-12)
    return torch.clamp(round_ste(w / scale), -qmax - 1, qmax) * scale


def _rel(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((y - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-12)


@dataclass
class _Layer:
    """One decoder layer's captured float inputs and its stream linears' float weights (``[in, out]``)."""

    readers: list[tuple[torch.Tensor, torch.Tensor]]  # (norm output, weight) of q, k, v, gate, up
    writers: list[tuple[torch.Tensor, torch.Tensor]]  # (input, weight) of o and down

    def loss(self, q: torch.Tensor, widths: Widths) -> torch.Tensor:
        terms = []
        rotated: dict[int, torch.Tensor] = {}  # q/k/v share one input, gate/up another
        for x, w in self.readers:
            if id(x) not in rotated:
                rotated[id(x)] = _fq_act(x @ q, widths.act_bits)
            wq = _fq_weight(q.T @ w, widths.weight_bits, widths.weight_block)
            terms.append(_rel(rotated[id(x)] @ wq, x @ w))
        for x, w in self.writers:
            wr = w @ q
            terms.append(_rel(x @ _fq_weight(wr, widths.weight_bits, widths.weight_block), x @ wr))
        return torch.stack(terms).mean()


def _capture(model: ir.Model, structure: Structure, windows: np.ndarray, tokens: int, seed: int) -> list[_Layer]:
    """Inputs of every stream linear on ``tokens`` random positions of each window (float model)."""
    mirror = Mirror(model)
    wanted: dict[str, list[torch.Tensor]] = {}
    for layer in structure.layers:
        for name in (layer.attn_norm.output, layer.mlp_norm.output, layer.attn.o.input, layer.mlp.down.input):
            wanted[name] = []
    rng = np.random.default_rng(seed)
    feed = mirror.input_names[0]
    for ids in windows:
        pick = torch.as_tensor(np.sort(rng.choice(len(ids), size=min(tokens, len(ids)), replace=False)))

        def tap(name: str, value: torch.Tensor, pick: torch.Tensor = pick) -> None:
            if name in wanted:
                wanted[name].append(value.reshape(-1, value.shape[-1])[pick].detach().clone())

        with torch.no_grad():
            mirror.run({feed: torch.as_tensor(ids).reshape(1, -1)}, tap=tap)
    x = {k: torch.cat(v) for k, v in wanted.items()}

    def weight(lin: Linear) -> torch.Tensor:
        return mirror.consts[lin.weight].float()  # [in, out]: rotate_residual refuses transposed weights

    layers = []
    for layer in structure.layers:
        a, m = layer.attn, layer.mlp
        attn_in, mlp_in = x[layer.attn_norm.output], x[layer.mlp_norm.output]
        readers = [(attn_in, weight(lin)) for lin in (a.q, a.k, a.v)] + [
            (mlp_in, weight(lin)) for lin in (m.gate, m.up)
        ]
        layers.append(_Layer(readers, [(x[a.o.input], weight(a.o)), (x[m.down.input], weight(m.down))]))
    return layers


def learn_r1(
    model: ir.Model,
    structure: Structure,
    windows: np.ndarray,
    widths: Widths,
    *,
    steps: int = 60,
    lr: float = 2e-3,
    tokens: int = 64,
    layers_per_step: int = 6,
    seed: int = 0,
) -> R1Result:
    """An orthogonal Q to merge as ``R1 ← R1·Q`` (by :func:`rewrites.rotate.rotate_residual`)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    layers = _capture(model, structure, windows, tokens, seed)
    hidden = structure.hidden_size
    gen = torch.nn.Parameter(torch.zeros(hidden, hidden, dtype=torch.float64))
    opt = torch.optim.Adam([gen], lr=lr)
    pick = torch.Generator().manual_seed(seed)

    def full(q: torch.Tensor) -> float:
        with torch.no_grad():
            return float(np.mean([layer.loss(q, widths).item() for layer in layers]))

    eye = torch.eye(hidden)
    before = full(eye)
    for _ in range(steps):
        chosen = torch.randperm(len(layers), generator=pick)[: min(layers_per_step, len(layers))]
        opt.zero_grad()
        q = cayley(gen).float()
        loss = torch.stack([layers[int(i)].loss(q, widths) for i in chosen]).mean()
        loss.backward()
        opt.step()
    learned = cayley(gen.detach())
    after = full(learned.float())
    kept = after < before
    rotation = learned.numpy() if kept else np.eye(hidden)
    seconds = time.perf_counter() - start
    log.info(
        "R1: stream linears' error %.4g -> %.4g (%s, %.0f s)", before, after, "kept" if kept else "dropped", seconds
    )
    return R1Result(rotation, before, after if kept else before, kept, seconds)

"""Learn static scales and rotations against the float model, then write them back (Quant.npu's core).

Two stages, selective, as Quant.npu describes them:

1. **Learn**, decoder layer by decoder layer, the ranges of the *rotated MatMul inputs* (the norm
   outputs the FCs read, o_proj's input; down_proj's input too when R4 rotates it or its outlier
   channels are split off), the clipping of
   every weight, and a rotation on top of each layer's Hadamard R2. Every other activation stays in
   float meanwhile. Loss: the layer's output against the float model's, per token normalised
   (a local distillation; the first steps use the quantization error of the learned tensors alone,
   which keeps early steps stable). Inputs are the *quantized* previous layers' outputs, cached, so
   each layer learns to absorb the error that reaches it.
2. **Calibrate** the remaining activations statically, on the model with stage 1 applied.

Why per-layer output MSE and not the logits' KL: a step then costs one layer, not thirty, which
is what makes learning fit in minutes on two CPU cores; the end-to-end loss would need ~30x the
compute per step for the same number of updates.

Write-back merges the learned rotations into the weights with :mod:`rewrites.rotate` and turns
every learned quantizer into an encoding, so :func:`onnxq.stages.qdq.emit_qdq` builds the QDQ model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from calib.layers import layer_ranges
from calib.observers import Observer
from calib.qsim import QuantSim
from onnxq.core import memory
from onnxq.core.errors import OnnxqError
from onnxq.core.options import LearnConfig
from onnxq.core.qtypes import Encoding, from_range
from onnxq.plan import Point, QuantPlan
from rewrites.rotate import rotate_heads
from rewrites.structure import Structure

log = logging.getLogger(__name__)

#: roles whose quantizers stage 1 learns: the inputs of MatMuls that a rotation makes near-Gaussian
STAGE1_ROLES = frozenset({"attn_in", "mlp_in", "attn_out"})


@dataclass
class LearnResult:
    model: ir.Model
    encodings: dict[str, Encoding]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    rotations: list[np.ndarray] | None = None  # the learned R2 per layer, merged into the model
    mirror: QuantSim | None = field(default=None, repr=False)  # what was learned: R2 applied in torch


def cayley(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal matrix (I - S)^-1 (I + S) of the skew-symmetric part S of ``a``."""
    s = (a - a.T) / 2
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - s, eye + s)


def stage1_points(plan: QuantPlan, down_in: bool) -> list[Point]:
    roles = STAGE1_ROLES | ({"down_in"} if down_in else set())
    return [
        p
        for p in plan.act_points()
        if p.role.kind in roles
        and p.role.layer is not None
        and not (p.kind == "act" and p.why == "htp: norm output is 16-bit")
    ]


def _token_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||y - t||² / ||t||²: every token counts, massive-activation ones too."""
    err = ((y - target) ** 2).sum(-1)
    norm = (target**2).sum(-1).clamp_min(1e-6)
    return (err / norm).mean()


class Learner:
    """Runs the two stages on a :class:`QuantSim`; holds caches between layers."""

    def __init__(self, sim: QuantSim, structure: Structure, config: LearnConfig, down_in: bool) -> None:
        self.sim = sim
        self.structure = structure
        self.config = config
        self.stage1 = stage1_points(sim.plan, down_in)
        self.ranges = layer_ranges(sim.mirror, structure)
        self.rot: dict[int, torch.nn.Parameter] = {}
        if config.learn_rotation:
            for layer in structure.layers:
                d = layer.attn.head_dim
                gen = torch.nn.Parameter(torch.zeros(d, d, dtype=torch.float64))
                self.rot[layer.index] = gen
                self._bind_r2(layer.index, gen)
        self.history: list[dict[str, float]] = []

    def _bind_r2(self, index: int, gen: torch.Tensor) -> None:
        layer = self.structure.layers[index]
        a = layer.attn
        base_v = self.sim.base[a.v.weight]
        base_o = self.sim.base[a.o.weight]
        d = a.head_dim

        def v_weight() -> torch.Tensor:
            q = cayley(gen).float()
            return (base_v.reshape(base_v.shape[0], a.num_kv_heads, d) @ q).reshape(base_v.shape)

        def o_weight() -> torch.Tensor:
            q = cayley(gen).float()
            return (q.T @ base_o.reshape(a.num_heads, d, base_o.shape[1])).reshape(base_o.shape)

        self.sim.weight_fn[a.v.weight] = v_weight
        self.sim.weight_fn[a.o.weight] = o_weight

    # ------------------------------------------------------------------ pieces
    def layer_weights(self, index: int) -> list[str]:
        """Weights of the layer's linears (and of its online rotations)."""
        return [p.name for p in self.sim.plan.weight_points() if p.role.layer == index]

    def run_layer(self, index: int, x: torch.Tensor, *, quantized: bool) -> torch.Tensor:
        first, last, inp, out = self.ranges[index]
        names = self.layer_weights(index)
        if quantized:
            self.sim.load_weights(names)
            return self.sim.mirror.run_steps(first, last, {inp: x}, tap=self.sim.tap, want=out)
        for name in names:
            self.sim.mirror.consts[name] = self.sim.effective_weight(name)
        return self.sim.mirror.run_steps(first, last, {inp: x}, tap=None, want=out)

    def prefix(self, ids: np.ndarray, *, quantized: bool) -> torch.Tensor:
        """Values entering layer 0 (the embedding), float or quantized."""
        first = self.ranges[0][0]
        feed = self.sim.mirror.input_names[0]
        tap = self.sim.tap if quantized else None
        env = self.sim.mirror.run(
            {feed: torch.as_tensor(ids).reshape(1, -1)}, tap=tap, stop_at=first - 1, keep=[self.ranges[0][2]]
        )
        return env[self.ranges[0][2]].detach()

    def local_loss(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Quantization error of the learned tensors and weights alone (the warm-up objective)."""
        first, last, inp, out = self.ranges[index]
        learned = {p.name for p in self.stage1 if p.role.layer == index}
        losses: list[torch.Tensor] = []

        def tap(name: str, value: torch.Tensor) -> torch.Tensor | None:
            for q in self.sim.taps.get(name, ()):
                if q in learned:
                    ref = value.detach()
                    quant = self.sim.act(q)(ref)
                    losses.append(((quant - ref) ** 2).mean() / (ref**2).mean().clamp_min(1e-12))
            return None

        for name in self.layer_weights(index):
            w = self.sim.effective_weight(name)
            self.sim.mirror.consts[name] = w
            wq = self.sim.wq(name)(w)
            losses.append(((wq - w) ** 2).mean() / (w**2).mean().clamp_min(1e-12))
        self.sim.mirror.run_steps(first, last, {inp: x}, tap=tap, want=out)
        return torch.stack(losses).mean()

    def _eval(self, index: int, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
        """The stage-1 objective on two of the windows: what learning a layer must lower."""
        with torch.no_grad():
            losses = [
                _token_mse(self.run_layer(index, x, quantized=True), y).item() for x, y in zip(xs, ys, strict=True)
            ]
        return float(np.mean(losses))

    def parameters_of(self, index: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        quant: list[torch.nn.Parameter] = []
        for p in self.stage1:
            if p.role.layer == index:
                act = self.sim.act(p.name)
                quant += [act.t_lo, act.t_hi]
        for name in self.layer_weights(index):
            quant.append(self.sim.wq(name).t)
        rot = [self.rot[index]] if index in self.rot else []
        return quant, rot

    # ------------------------------------------------------------------ stages
    def stage1_run(
        self, windows: np.ndarray, progress: Callable[..., None] | None = None, checkpoint: Path | None = None
    ) -> None:
        cfg = self.config
        sim = self.sim
        sim.enable(None, on=False)
        sim.enable([p.name for p in self.stage1], on=True)
        start_layer, state = 0, None
        if checkpoint is not None and checkpoint.exists():
            state = torch.load(checkpoint, weights_only=False)
            if state.get("digest") == cfg.digest():
                sim.load_state_dict(state["sim"], strict=False)
                for k, v in state["rot"].items():
                    self.rot[int(k)].data.copy_(v)
                start_layer = int(state["layers_done"])
                self.history = state["history"]
                log.info("resuming learning after layer %d", start_layer - 1)
        with torch.no_grad():
            x_fp = [self.prefix(w, quantized=False) for w in windows]
            x_q = [self.prefix(w, quantized=True) for w in windows]
            for i in range(start_layer):  # replay finished layers to rebuild the caches
                x_fp = [self.run_layer(i, x, quantized=False) for x in x_fp]
                x_q = [self.run_layer(i, x, quantized=True) for x in x_q]
        gen = torch.Generator().manual_seed(cfg.seed)
        for i in range(start_layer, len(self.ranges)):
            t0 = time.perf_counter()
            with torch.no_grad():
                y_fp = [self.run_layer(i, x, quantized=False) for x in x_fp]
            start = self._eval(i, x_q[:2], y_fp[:2])
            quant, rot = self.parameters_of(i)
            saved = [p.detach().clone() for p in quant + rot]
            groups = [{"params": quant, "lr": cfg.lr}]
            if rot:
                groups.append({"params": rot, "lr": cfg.rotation_lr})
            opt = torch.optim.Adam(groups)
            first_loss = last_loss = float("nan")
            for step in range(cfg.steps):
                j = int(torch.randint(len(windows), (1,), generator=gen))
                opt.zero_grad()
                if step < cfg.warmup:
                    loss = self.local_loss(i, x_q[j])
                else:
                    loss = _token_mse(self.run_layer(i, x_q[j], quantized=True), y_fp[j])
                loss.backward()
                opt.step()
                if step == cfg.warmup:
                    first_loss = loss.item()
                last_loss = loss.item()
            end = self._eval(i, x_q[:2], y_fp[:2])
            reverted = end > start
            if reverted:  # selective: a layer that learning made worse keeps its initial state
                with torch.no_grad():
                    for p, v in zip(quant + rot, saved, strict=True):
                        p.copy_(v)
                end = self._eval(i, x_q[:2], y_fp[:2])
            with torch.no_grad():
                x_q = [self.run_layer(i, x, quantized=True) for x in x_q]
            for name in self.layer_weights(i):  # the layer's fake-quantized copies: stage 2 makes them again
                sim.mirror.consts[name] = sim.base[name]
            x_fp = y_fp
            self.history.append(
                {
                    "layer": i,
                    "loss_first": first_loss,
                    "loss_last": last_loss,
                    "eval_before": start,
                    "eval": end,
                    "reverted": reverted,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            log.info("layer %d: error %.4g -> %.4g (%.1f s)", i, start, end, time.perf_counter() - t0)
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "digest": cfg.digest(),
                        "sim": sim.state_dict(),
                        "rot": {str(k): v.data for k, v in self.rot.items()},
                        "layers_done": i + 1,
                        "history": self.history,
                    },
                    checkpoint,
                )
            if progress is not None:  # the CLI shows the note after the bar
                progress(1, f"layer {i} error {start:.3g} -> {end:.3g}")

    def stage2_run(self, windows: np.ndarray, method: str) -> None:
        """Calibrate every other activation on the model with stage 1 applied (no gradients)."""
        from calib.calibrate import method_for

        sim = self.sim
        learned = {p.name for p in self.stage1}
        rest = [p for p in sim.plan.act_points() if p.name not in learned and p.fixed_range is None]
        sim.enable(None, on=False)
        sim.enable(list(learned), on=True)
        observers = {p.name: Observer(histogram=method_for(p, method) != "minmax") for p in rest}
        by_root: dict[str, list[Observer]] = {}
        for p in rest:
            for r in p.roots:
                by_root.setdefault(r, []).append(observers[p.name])

        def tap(name: str, value: torch.Tensor) -> torch.Tensor | None:
            for obs in by_root.get(name, ()):
                obs.update(value)
            return sim.tap(name, value)

        feed = sim.mirror.input_names[0]
        with torch.no_grad():
            sim.load_weights()
            for w in windows:
                sim.mirror.run({feed: torch.as_tensor(w).reshape(1, -1)}, tap=tap)
        for p in rest:
            obs = observers[p.name]
            if obs.count == 0:
                continue  # constant-only groups (embedding) keep their encoding
            stats = obs.stats(
                method_for(p, method), p.spec.qmax - p.spec.qmin, symmetric=p.spec.symmetric, signed=p.spec.qtype.signed
            )
            lo, hi = stats.lo, stats.hi
            old_lo, old_hi = sim.act(p.name).encoding().range()
            if p.consts:  # ranges that must also cover constants (embedding table)
                lo, hi = min(lo, old_lo), max(hi, old_hi)
            sim.act(p.name).reset(from_range(p.spec, lo, hi))
        sim.enable(None, on=True)


def learn(
    model: ir.Model,
    structure: Structure,
    plan: QuantPlan,
    encodings: dict[str, Encoding],
    train_windows: np.ndarray,
    calib_windows: np.ndarray,
    *,
    config: LearnConfig,
    method: str = "auto",
    down_in: bool = False,
    progress: Callable[..., None] | None = None,
    checkpoint: Path | None = None,
) -> LearnResult:
    """Run both stages and write back: returns the model with learned rotations merged, and encodings.

    ``down_in``: stage 1 learns the down_proj inputs' ranges too (R4 rotates them, or their outlier
    channels were split off, so a learned range no longer has to cover massive activations).
    """
    torch.manual_seed(config.seed)
    if config.device != "cpu" and not torch.cuda.is_available():
        raise OnnxqError(f"--device {config.device} is not available here", "use --device cpu")
    start = time.perf_counter()
    sim = QuantSim(model, plan, encodings)
    learner = Learner(sim, structure, config, down_in)
    if config.device != "cpu":
        sim.mirror.to_device(config.device)
        sim.to(config.device)
    learner.stage1_run(train_windows, progress, checkpoint)
    memory.release()  # stage 1's per-step tensors, before stage 2 runs the whole model
    learner.stage2_run(calib_windows, method)
    return write_back(model, structure, learner, time.perf_counter() - start)


def write_back(model: ir.Model, structure: Structure, learner: Learner, seconds: float) -> LearnResult:
    """Merge learned rotations into ``model`` (in place) and collect every point's encoding."""
    sim = learner.sim
    rotations = None
    if learner.rot:
        rotations = [cayley(learner.rot[i].detach().cpu()).numpy() for i in range(len(structure.layers))]
        rotate_heads(model, structure, rotations)
    encodings: dict[str, Encoding] = {}
    for point in sim.plan.points.values():
        if point.kind in ("act", "convert"):
            encodings[point.name] = sim.act(point.name).encoding()
        elif point.kind == "weight":
            weight = model.graph.initializers[point.name].const_value.numpy().astype(np.float64)
            wq = sim.wq(point.name)
            if point.spec.block_size:  # LPBQ: learned block clips, snapped to the two-level grid
                encodings[point.name] = wq.encoding(torch.as_tensor(weight))
                continue
            axis = point.spec.axis if point.spec.axis is not None else 1
            amax = np.abs(np.moveaxis(weight, axis, -1).reshape(-1, weight.shape[axis])).max(axis=0)
            ratio = torch.clamp(wq.ratio0 * torch.exp(wq.t.detach()), max=1.0).cpu().numpy()
            encodings[point.name] = from_range(point.spec, -ratio * amax, ratio * amax)
        else:
            from onnxq.core.encodings import const_encoding

            arrays = [model.graph.initializers[c].const_value.numpy() for c in point.consts]
            encodings[point.name] = const_encoding(point.spec, *arrays)
    return LearnResult(model, encodings, learner.history, seconds, rotations, sim)

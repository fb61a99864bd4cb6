"""The quantized model, simulated in the torch mirror: what the QDQ graph computes, but differentiable.

A :class:`QuantSim` runs the canonical float graph in the :class:`~calib.mirror.Mirror` and inserts,
exactly where :func:`onnxq.stages.qdq.emit_qdq` puts Q/DQ pairs, the matching quantizer:

- activation points: a tap on each *root* tensor applies the point's :class:`ActQuant`; data
  movement carries the quantized value on, as it carries the grid in the QDQ graph; a convert
  point (an FC reading a norm output at 8 bits) is applied after its source's quantizer;
- weights: each forward recomputes ``WeightQuant(W)`` (after any learned rotation of W);
- constants and the embedding table: fake-quantized once with their fixed encodings;
- a frozen sim (nothing learned) holds no fake-quantized copies: each step reads the part it needs
  (a MatMul a block of columns, a Gather its rows), fake-quantized there.

Any quantizer can be switched off (float), which is how the two-stage optimisation keeps
everything but the selected points in float during stage 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

import numpy as np
import onnx_ir as ir
import torch

from calib.fakequant import ActQuant, WeightQuant, fixed
from calib.mirror import Mirror, to_torch
from onnxq.core.qtypes import Encoding
from onnxq.plan import Point, QuantPlan


def _key(name: str) -> str:
    return name.replace(".", "_")


class QuantSim(torch.nn.Module):
    """Fake-quantized execution of a canonical float model under a plan and its encodings."""

    def __init__(
        self, model: ir.Model, plan: QuantPlan, encodings: Mapping[str, Encoding], *, frozen: bool = False
    ) -> None:
        """``frozen``: nothing will be learned, so each weight and constant is fake-quantized, without
        gradients, when a step reads it, instead of being held fake-quantized beside its float value
        (the sensitivity pass's memory: a 128k-vocabulary embedding or lm_head is a gigabyte)."""
        super().__init__()
        self.plan = plan
        self.frozen = frozen
        self.mirror = Mirror(model)
        self.acts = torch.nn.ModuleDict()
        self.weights = torch.nn.ModuleDict()
        self.base: dict[str, torch.Tensor] = {}  # float weights before quantization (rotations apply here)
        self.weight_fn: dict[str, object] = {}  # name -> callable returning the effective float weight
        taps: dict[str, list[str]] = {}
        for point in plan.points.values():
            if point.kind in ("act", "convert"):
                self.acts[_key(point.name)] = ActQuant(point.spec, encodings[point.name])
        # own point first, then converts / groups that read the same root
        for point in plan.points.values():
            if point.kind == "act":
                for root in point.roots:
                    if root in point.tensors:
                        taps.setdefault(root, []).append(point.name)
        for point in plan.points.values():
            if point.kind in ("act", "convert"):
                for root in point.roots:
                    if root not in point.tensors:
                        taps.setdefault(root, []).append(point.name)
        self.taps = taps
        for point in plan.points.values():
            enc = encodings[point.name]
            if point.kind == "weight":
                w = self.mirror.consts[point.name].float()
                self.base[point.name] = w
                self.weights[_key(point.name)] = WeightQuant(point.spec, w, enc)
            elif point.kind in ("const", "act"):
                for const in point.consts:  # constants and the embedding table: fixed encodings
                    value = self.mirror.consts[const].float()
                    if frozen:
                        self.mirror.consts[const] = value
                        self.mirror.on_read[const] = partial(fixed, enc, value)
                    else:
                        self.mirror.consts[const] = fixed(enc, value)
        if frozen:
            for name in self.base:
                self.mirror.on_read[name] = partial(self._read, name)
            self.requires_grad_(False)  # a backward pass then keeps only what the activations' gradients need

    # ------------------------------------------------------------------ control
    def act(self, name: str) -> ActQuant:
        return self.acts[_key(name)]  # type: ignore[return-value]

    def wq(self, name: str) -> WeightQuant:
        return self.weights[_key(name)]  # type: ignore[return-value]

    def enable(self, names: Iterable[str] | None = None, on: bool = True) -> None:
        """Switch activation quantizers on or off (all of them when ``names`` is None)."""
        targets = self.plan.act_points() if names is None else [self.plan.points[n] for n in names]
        for point in targets:
            self.act(point.name).enabled = on

    def effective_weight(self, name: str) -> torch.Tensor:
        fn = self.weight_fn.get(name)
        return fn() if fn is not None else self.base[name]  # type: ignore[operator]

    def load_weights(self, names: Iterable[str] | None = None) -> None:
        """Put the fake-quantized (and possibly rotated) weights into the mirror."""
        for name in names if names is not None else self.base:
            self.mirror.consts[name] = self.wq(name)(self.effective_weight(name))

    def _read(self, name: str, part: slice | torch.Tensor | None = None) -> torch.Tensor:
        return self.wq(name).frozen(self.effective_weight(name), part)

    # ------------------------------------------------------------------ running
    def tap(self, name: str, value: torch.Tensor) -> torch.Tensor | None:
        quantizers = self.taps.get(name)
        if not quantizers:
            return None
        for q in quantizers:
            value = self.act(q)(value)
        return value

    def forward(self, input_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        if not self.frozen:  # a frozen sim's weights are computed where they are read
            self.load_weights()
        feed = self.mirror.input_names[0]
        ids = input_ids if isinstance(input_ids, torch.Tensor) else to_torch(np.asarray(input_ids))
        out = self.mirror.run({feed: ids.reshape(1, -1)}, tap=self.tap)
        return out[self.mirror.output_names[0]]

    def encodings(self) -> dict[str, Encoding]:
        """The current encodings of every point (learned ones included)."""
        out: dict[str, Encoding] = {}
        for point in self.plan.points.values():
            if point.kind in ("act", "convert"):
                out[point.name] = self.act(point.name).encoding()
            elif point.kind == "weight":
                out[point.name] = self.wq(point.name).encoding(self.effective_weight(point.name))
        return out

    def points_of_layer(self, layer: int) -> list[Point]:
        return [p for p in self.plan.points.values() if p.role.layer == layer]


def weight_array(sim: QuantSim, name: str) -> np.ndarray:
    """The effective float weight (e.g. after a learned rotation) as numpy, for write-back."""
    return sim.effective_weight(name).detach().double().numpy()

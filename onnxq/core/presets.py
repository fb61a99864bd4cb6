"""Named bit-width presets: ``w{weight bits}a{activation bits}``.

``a8`` means the activations that feed MatMuls are 8-bit; the roles a recipe keeps at 16 bits
(residual stream, norms, softmax) stay there, as on Qualcomm's own deployments. ``a16`` makes every
activation 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxq.core.errors import OnnxqError


@dataclass(frozen=True)
class Preset:
    name: str
    weight_bits: int
    act_bits: int

    @property
    def narrow(self) -> bool:
        """4-bit weights or 8-bit activations: where GPTQ and the run-time rotations pay for their cost
        (at W8A16 round-to-nearest is already next to float; BENCHMARKS.md, the ``defaults`` rows)."""
        return self.weight_bits == 4 or self.act_bits < 16

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "weight_bits": self.weight_bits, "act_bits": self.act_bits}


PRESETS = {
    p.name: p for p in (Preset("w8a16", 8, 16), Preset("w8a8", 8, 8), Preset("w4a16", 4, 16), Preset("w4a8", 4, 8))
}


def get(name: str) -> Preset:
    """The preset called ``name``, or a one-line error listing the known ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise OnnxqError(f"unknown preset {name!r}", f"use one of: {', '.join(PRESETS)}") from None

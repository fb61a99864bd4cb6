"""What every rewrite returns: the model, whether it changed, and counts a user can read.

Rewrites work in place on a model the pipeline owns (never on the user's file) and return it, like
onnx-ir's in-place passes; a pipeline is a list of them applied in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir


@dataclass(frozen=True)
class RewriteResult:
    """Outcome of one rewrite: ``counts`` says what it did ("merged R1 into 212 MatMuls")."""

    model: ir.Model
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def modified(self) -> bool:
        return any(self.counts.values())

    def summary(self) -> str:
        done = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) or "nothing to do"
        return f"{self.name}: {done}"


Rewrite = Callable[[ir.Model], RewriteResult]


def apply(model: ir.Model, rewrites: Sequence[Rewrite]) -> tuple[ir.Model, list[RewriteResult]]:
    """Run ``rewrites`` in order, threading the model through."""
    results = []
    for rewrite in rewrites:
        result = rewrite(model)
        model = result.model
        results.append(result)
    return model, results

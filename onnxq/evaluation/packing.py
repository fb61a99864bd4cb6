"""Many (context, continuation) log-likelihoods from few runs of a static scoring graph.

Zero-shot requests are short (PIQA ~40 tokens, HellaSwag ~90) and share their context between the
choices of an item. One request per 512-token window spends most of the compute on padding; here
each context is laid out once, followed by all its continuations, and several items share a window.
The graph gets the positions and the mask as inputs (:func:`rewrites.positions.expose_positions`):
every continuation restarts at the position after its context and sees only its context and its
own earlier tokens, so each request's logits are those of a run on its own, up to float rounding
(tested against the one-request-per-window path, float and QDQ). A request longer than the window,
or with an empty context, is scored on its own as before. The evaluation copy of the graph is written
to a temporary folder for ONNX Runtime (disk and memory: one more copy of the model while loading).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Request = tuple[Sequence[int], Sequence[int]]


@dataclass
class _Unit:
    """A context and the continuations that follow it (request index, tokens)."""

    ctx: tuple[int, ...]
    conts: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ctx) + sum(len(c) for _, c in self.conts)


@dataclass
class Window:
    """One run's inputs and, per request scored in it, the logits rows and their target tokens."""

    ids: np.ndarray
    positions: np.ndarray
    attend: np.ndarray
    picks: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)


def layout(requests: Sequence[Request], seq_len: int) -> tuple[list[Window], list[int]]:
    """Pack ``requests`` into windows (first fit, in order: deterministic); also the indices of the
    requests that cannot be packed (longer than the window, or without context)."""
    units: list[_Unit] = []
    current: dict[tuple[int, ...], _Unit] = {}  # the open unit of each context
    alone: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        key = tuple(ctx)
        if not ctx or not cont or len(ctx) + len(cont) > seq_len:
            alone.append(i)
            continue
        unit = current.get(key)
        if unit is None or unit.size + len(cont) > seq_len:  # a full unit: the context again, in a new one
            unit = current[key] = _Unit(key)
            units.append(unit)
        unit.conts.append((i, tuple(cont)))
    bins: list[list[_Unit]] = []
    room: list[int] = []
    for unit in units:
        k = next((b for b, free in enumerate(room) if free >= unit.size), None)
        if k is None:
            bins.append([])
            room.append(seq_len)
            k = len(bins) - 1
        bins[k].append(unit)
        room[k] -= unit.size
    return [_fill(b, seq_len) for b in bins], alone


def _fill(units: list[_Unit], seq_len: int) -> Window:
    ids = np.zeros((1, seq_len), dtype=np.int64)
    pos = np.zeros((1, seq_len), dtype=np.int64)
    attend = np.eye(seq_len, dtype=bool)[None, None]  # padding sees itself: no empty softmax row
    window = Window(ids, pos, attend)
    at = 0
    for unit in units:
        n = len(unit.ctx)
        ctx = slice(at, at + n)
        ids[0, ctx] = unit.ctx
        pos[0, ctx] = np.arange(n)
        attend[0, 0, ctx, ctx] = np.tril(np.ones((n, n), dtype=bool))
        at += n
        for index, cont in unit.conts:
            m = len(cont)
            own = slice(at, at + m)
            ids[0, own] = cont
            pos[0, own] = np.arange(n, n + m)
            attend[0, 0, own, ctx] = True
            attend[0, 0, own, own] = np.tril(np.ones((m, m), dtype=bool))
            # the first continuation token is predicted at the context's last position
            rows = np.concatenate([[ctx.stop - 1], np.arange(at, at + m - 1)])
            window.picks.append((index, rows, np.asarray(cont)))
            at += m
    return window


class PackedSession:
    """An ONNX Runtime CPU session of a scoring graph with positions and mask exposed."""

    def __init__(self, model: str | Path) -> None:
        import onnxruntime as ort

        from onnxq.core import ir as oir
        from rewrites.positions import expose_positions

        ir_model = oir.load(model)
        result = expose_positions(ir_model)  # also checks for one static input_ids [1, S]
        inputs = result.model.graph.inputs
        self.seq_len = int(inputs[0].shape[1])
        self.feed = inputs[0].name or "input_ids"
        self.packable = result.modified
        self.names = tuple(v.name or "" for v in inputs)  # input_ids, position_ids, attend (in that order)
        with tempfile.TemporaryDirectory(prefix="onnxq-packed-") as tmp:
            oir.save(result.model, Path(tmp) / "packed.onnx")
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.sess: Any = ort.InferenceSession(
                str(Path(tmp) / "packed.onnx"), sess_options=so, providers=["CPUExecutionProvider"]
            )

    def run(self, ids: np.ndarray, positions: np.ndarray, attend: np.ndarray) -> np.ndarray:
        return self.sess.run(None, dict(zip(self.names, (ids, positions, attend), strict=True)))[0][0]

    def run_plain(self, window: np.ndarray) -> np.ndarray:
        """One sequence from position 0 with the causal mask: the unpacked graph's run."""
        if not self.packable:
            return self.sess.run(None, {self.feed: window})[0]
        causal = np.tril(np.ones((self.seq_len, self.seq_len), dtype=bool))[None, None]
        return self.run(window, np.arange(self.seq_len, dtype=np.int64)[None], causal)[None]

    def loglikelihoods(
        self, requests: Sequence[Request], progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) and ``is_greedy`` for every request, in order."""
        from onnxq.evaluation.zeroshot import loglikelihood, score

        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        windows, alone = layout(requests, self.seq_len) if self.packable else ([], list(range(len(requests))))
        for window in windows:
            logits = self.run(window.ids, window.positions, window.attend)
            for index, rows, target in window.picks:
                out[index] = score(logits[rows], target)
            if progress is not None:
                progress(len(window.picks))
        for index in alone:
            out[index] = loglikelihood(self.run_plain, self.seq_len, *requests[index])
            if progress is not None:
                progress(1)
        return out

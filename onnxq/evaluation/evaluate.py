"""Perplexity of an ONNX scoring graph on ONNX Runtime (CPU) or the QNN EP (HTP).

Windows are scored independently: each predicts its tokens 1..S-1 from the ones before it, and
perplexity is exp of the mean negative log-likelihood over all windows (the convention of published
results), so every configuration is compared on the same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxq.core.errors import OnnxqError
from onnxq.device.qnn import make_session


@dataclass
class PerplexityResult:
    dataset: str
    windows: int
    seq_len: int
    tokens: int
    nll: float
    seconds: float
    ep: str
    per_window: list[float] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (float64, stable)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])[:-1]
    target = np.asarray(ids).reshape(-1)[1:]
    peak = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return logz - logits[np.arange(len(target)), target]


def pair_perplexity(
    folder: str | Path,
    windows: np.ndarray,
    *,
    ep: str = "cpu",
    dataset: str = "",
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a KV-cache pair as deployed: each window streamed through prefill chunk by chunk, the
    cache (and its quantizers) carried from chunk to chunk; scored like :func:`perplexity`."""
    from onnxq.device.generate import Stepper

    stepper = Stepper(folder, ep)
    seq_len = windows.shape[1]
    if seq_len > stepper.shape.slots:
        raise OnnxqError(
            f"{folder} holds {stepper.shape.slots} positions, the windows have {seq_len}",
            f"pass --seq-len {stepper.shape.slots} or less",
        )

    def logits(ids: np.ndarray) -> np.ndarray:
        stepper.reset()
        return stepper.step(ids)

    return _score(str(folder), logits, windows, ep, dataset, progress)


def perplexity(
    model: str | Path,
    windows: np.ndarray,
    *,
    ep: str = "cpu",
    dataset: str = "",
    session: object | None = None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` (``[n, S]`` token ids)."""
    sess = session or make_session(model, ep)
    inputs = sess.get_inputs()  # type: ignore[attr-defined]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise OnnxqError(
            f"{model} takes inputs {names}; eval feeds input_ids only",
            "quantize it first (onnxq quantize folds mask/position inputs) or export with onnxq export",
        )
    expected = inputs[0].shape
    seq_len = windows.shape[1]
    if len(expected) == 2 and isinstance(expected[1], int) and expected[1] != seq_len:
        raise OnnxqError(f"{model} takes {expected[1]} tokens, the windows have {seq_len}", "pass --seq-len to match")

    def logits(ids: np.ndarray) -> np.ndarray:
        return sess.run(None, {inputs[0].name: ids.reshape(1, -1)})[0]  # type: ignore[attr-defined]

    return _score(str(model), logits, windows, ep, dataset, progress)


def _score(
    name: str,
    logits: Callable[[np.ndarray], np.ndarray],
    windows: np.ndarray,
    ep: str,
    dataset: str,
    progress: Callable[[int], None] | None,
) -> PerplexityResult:
    """Perplexity over ``windows`` of whatever ``logits`` computes for a window's ids."""
    total, count, per_window = 0.0, 0, []
    start = time.perf_counter()
    for window in windows:
        ids = np.asarray(window, dtype=np.int64)
        nll = token_nll(logits(ids), ids)
        if not np.all(np.isfinite(nll)):
            raise OnnxqError(f"{name} produced NaN/inf logits", "check it with `onnxq validate`")
        total += float(nll.sum())
        count += nll.size
        per_window.append(float(nll.mean()))
        if progress is not None:
            progress(1)
    seconds = time.perf_counter() - start
    return PerplexityResult(dataset, len(windows), windows.shape[1], count, total / count, seconds, ep, per_window)

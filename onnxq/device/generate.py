"""Text generation with the prefill and decode graphs of :mod:`onnxq.stages.export_kv`, the cache on the host.

The prompt goes through the prefill graph in chunks of N tokens; each new token then through the
decode graph. After every step the new K/V entries are written into the cache at their positions,
the way an on-device runner does it. Works on ONNX Runtime CPU or the QNN EP (HTP).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError
from onnxq.core.steps import PARTS_SUFFIX, CacheShape, StepRunner

PREFILL, DECODE = "prefill.onnx", "decode.onnx"


def graphs(folder: str | Path) -> tuple[Path, Path]:
    """The prefill and decode graphs in ``folder``: compiled in parts, quantized (``*.qdq.onnx``) or float."""
    folder = Path(folder)
    for suffix in (PARTS_SUFFIX, ".qdq.onnx", ".onnx"):
        pair = (folder / f"prefill{suffix}", folder / f"decode{suffix}")
        if all(p.exists() for p in pair):
            return pair
    raise OnnxqError(
        f"{folder} has no prefill/decode graphs", "export with `onnxq export --kv-cache -o FOLDER` (then quantize it)"
    )


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    _shown: str = field(default="", repr=False)  # the text streamed so far

    def add(self, token: int, tok: Any, on_token: Callable[[str], None] | None) -> None:
        """Append ``token`` and decode the text anew (a token may complete a character); stream what it adds."""
        self.tokens.append(token)
        self.text = tok.decode(self.tokens, skip_special_tokens=True)
        if on_token is not None and self.text.startswith(self._shown):
            on_token(self.text[len(self._shown) :])
            self._shown = self.text

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        steps = max(len(self.tokens) - 1, 0)  # the first new token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Stepper(StepRunner):
    """The pair in ``folder`` on ``ep`` (``cpu`` or ``qnn``)."""

    def __init__(self, folder: str | Path, ep: str = "cpu", **qnn_options: Any) -> None:
        from onnxq.device.parts import open_graph

        super().__init__(*graphs(folder), lambda path: open_graph(path, ep, **qnn_options))


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        cut = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    p = np.exp(scaled - scaled.max())
    return int(rng.choice(scaled.size, p=p / p.sum()))


def generate(
    folder: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 40,
    seed: int = 0,
    ep: str = "cpu",
    tokenizer: Any = None,
    on_token: Callable[[str], None] | None = None,
    stepper: Stepper | None = None,
) -> Generation:
    """Greedy (``temperature=0``) or sampled continuation of ``prompt``; ``on_token`` streams text."""
    from onnxq.core.sources import tokenizer_for

    tok = tokenizer or tokenizer_for(graphs(folder)[0])
    run = stepper or Stepper(folder, ep)
    run.reset()
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise OnnxqError("the prompt is empty", "pass some text with --prompt")
    rng = np.random.default_rng(seed)
    result = Generation(prompt_tokens=len(ids))
    t = time.perf_counter()
    logits = run.step(ids)[-1]
    result.prefill_seconds = time.perf_counter() - t
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    t = time.perf_counter()
    for i in range(max_new_tokens):
        token = _pick(logits, temperature, top_k, rng)
        result.add(token, tok, on_token)
        if token in eos or i == max_new_tokens - 1 or run.position >= run.shape.slots:
            break
        logits = run.step([token])[-1]
    result.decode_seconds = time.perf_counter() - t
    return result


__all__ = ["CacheShape", "Generation", "Stepper", "generate"]

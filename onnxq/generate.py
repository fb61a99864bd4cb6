"""Text generation with the prefill and decode graphs of :mod:`onnxq.export_kv`, the cache on the host.

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

from onnxq.errors import OnnxqError
from onnxq.export_kv import CacheShape, read_shape, step_inputs

PREFILL, DECODE = "prefill.onnx", "decode.onnx"


def graphs(folder: str | Path) -> tuple[Path, Path]:
    """The prefill and decode graphs in ``folder``: quantized (``*.qdq.onnx``) if there, else float."""
    folder = Path(folder)
    for suffix in (".qdq.onnx", ".onnx"):
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


class Stepper:
    """Two sessions and one cache: run chunks of tokens at increasing positions."""

    def __init__(self, folder: str | Path, ep: str = "cpu", **qnn_options: Any) -> None:
        from onnxq.evaluate import make_session

        prefill, decode = graphs(folder)
        self.chunk, self.shape, self.mask_value = read_shape(prefill)
        decode_chunk, decode_shape, _ = read_shape(decode)
        if decode_chunk != 1 or decode_shape != self.shape:
            raise OnnxqError(f"{folder}: {decode.name} does not match {prefill.name}", "export both in one run")
        self.prefill = make_session(prefill, ep, **qnn_options)
        self._decode_graph, self._ep, self._qnn_options = decode, ep, qnn_options
        self._decode: Any = None
        self.cache = self.shape.empty()
        self.position = 0

    @property
    def decode(self) -> Any:
        """The decode session, made when first used: scoring whole chunks never needs it, and on the HTP
        each session holds a context of the model's size."""
        if self._decode is None:
            from onnxq.evaluate import make_session

            self._decode = make_session(self._decode_graph, self._ep, **self._qnn_options)
        return self._decode

    def reset(self) -> None:
        self.cache = self.shape.empty()
        self.position = 0

    def step(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Run ``ids`` (chunked as needed) from the current position; returns their logits [n, vocab]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = []
        start = 0
        while start < len(ids):
            take = self.chunk if len(ids) - start > 1 else 1
            part = ids[start : start + take]
            out.append(self._run(part, self.prefill if take > 1 else self.decode, take))
            start += len(part)
        return np.concatenate(out, axis=0)

    def _run(self, part: np.ndarray, sess: Any, chunk: int) -> np.ndarray:
        n = len(part)
        if self.position + n > self.shape.slots:
            raise OnnxqError(f"the context is full ({self.shape.slots} positions)", "export with a larger --context")
        feeds = step_inputs(part, self.position, chunk, self.shape, self.mask_value)
        feeds.update(self.cache)
        names = [o.name for o in sess.get_outputs()]
        results = dict(zip(names, sess.run(None, feeds), strict=True))
        for i in range(self.shape.layers):
            for kv in ("key", "value"):
                present = results[f"present_{kv}_{i}"]
                self.cache[f"past_{kv}_{i}"][:, :, self.position : self.position + n] = present[:, :, :n]
        self.position += n
        return results["logits"][0, :n]


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
    from onnxq.sources import tokenizer_for

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

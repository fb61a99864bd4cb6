"""Run any lm-eval-harness task on an onnxq model (a thin adapter; lm-eval is not a dependency).

    import lm_eval
    from onnxq.evaluation.harness import OnnxqLM

    lm_eval.simple_evaluate(model=OnnxqLM("out/model.qdq.onnx"), tasks=["arc_easy"], limit=200)

The scoring graph has a static length: on CPU, log-likelihood requests are packed several to a
window (:mod:`onnxq.evaluation.packing`), elsewhere each is one run of a right-padded window. Generation
re-runs the window per new token (slow, but exact; the KV-cache graphs of ``onnxq export
--kv-cache`` are the fast path for generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError


class Scorer:
    """Log-likelihoods and greedy continuations from a static ONNX scoring graph (no lm-eval needed)."""

    def __init__(self, model: str | Path, ep: str = "cpu", tokenizer: Any = None) -> None:
        from onnxq.core.sources import tokenizer_for
        from onnxq.device.qnn import make_session
        from onnxq.evaluation.packing import PackedSession

        self.tok = tokenizer or tokenizer_for(model)
        self.packed: PackedSession | None = None
        if ep == "cpu":  # positions and mask as inputs: many requests per run (onnxq.evaluation.packing)
            self.packed = PackedSession(model)
            self.seq_len = self.packed.seq_len
            return
        self.sess: Any = make_session(model, ep)
        inputs = self.sess.get_inputs()
        if len(inputs) != 1:
            raise OnnxqError(f"{model} takes {len(inputs)} inputs", "use the scoring graph of `onnxq export`")
        self.feed = inputs[0].name
        self.seq_len = int(inputs[0].shape[-1])

    def run(self, window: np.ndarray) -> np.ndarray:
        if self.packed is not None:
            return self.packed.run_plain(window)
        return self.sess.run(None, {self.feed: window})[0]

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """log p(continuation | context) and whether the continuation is the greedy one."""
        return self.loglikelihoods([(context, continuation)])[0]

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` of many (context, continuation) pairs, packed into few runs on CPU."""
        from onnxq.evaluation.zeroshot import encode_pair, loglikelihood

        requests = [encode_pair(self.tok, context, continuation) for context, continuation in pairs]
        if self.packed is not None:
            return self.packed.loglikelihoods(requests)
        return [loglikelihood(self.run, self.seq_len, ctx, cont) for ctx, cont in requests]

    def rolling(self, text: str) -> float:
        """log p(text), window after window (each window sees the previous token as context)."""
        from onnxq.evaluation.zeroshot import loglikelihood

        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        first = [self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id or 0]
        step = self.seq_len - 1
        return sum(
            loglikelihood(self.run, self.seq_len, (first + ids)[start : start + 1], ids[start : start + step])[0]
            for start in range(0, len(ids), step)
        )

    def greedy(self, context: str, until: Sequence[str], max_new_tokens: int = 64) -> str:
        ids = list(self.tok(context, add_special_tokens=False)["input_ids"])
        out: list[int] = []
        for _ in range(max_new_tokens):
            tokens = (ids + out)[-self.seq_len :]
            window = np.zeros((1, self.seq_len), dtype=np.int64)
            window[0, : len(tokens)] = tokens
            nxt = int(np.argmax(self.run(window)[0][len(tokens) - 1]))
            if nxt == self.tok.eos_token_id:
                break
            out.append(nxt)
            text = self.tok.decode(out)
            if any(stop in text for stop in until):
                return text.split(next(stop for stop in until if stop in text))[0]
        return self.tok.decode(out)


def _lm_class() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise OnnxqError("lm-eval is not installed", "pip install lm-eval") from None

    class OnnxqLM(LM):  # type: ignore[misc,valid-type]
        """lm-eval-harness model over an onnxq (or any static scoring) ONNX graph."""

        def __init__(self, model: str, ep: str = "cpu", **_: Any) -> None:
            super().__init__()
            self.scorer = Scorer(model, ep)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            del disable_tqdm  # lm-eval's signature; progress is the harness's own
            return self.scorer.loglikelihoods([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            del disable_tqdm
            return [self.scorer.rolling(r.args[0]) for r in requests]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            del disable_tqdm
            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until", []) or []
                out.append(self.scorer.greedy(context, until, int(kwargs.get("max_gen_toks", 64))))
            return out

    return OnnxqLM


def __getattr__(name: str) -> Any:
    """``OnnxqLM`` is built on first access, so importing this module never needs lm-eval."""
    if name == "OnnxqLM":
        return _lm_class()
    raise AttributeError(name)

"""Zero-shot multiple choice (PIQA, HellaSwag) on an ONNX scoring graph, scored as lm-eval-harness does.

Each choice is scored by the log-likelihood of its tokens after the context; ``acc`` picks the
highest sum, ``acc_norm`` the highest sum per character of the choice. The context/continuation
split follows lm-eval: trailing spaces of the context move to the continuation, the whole text is
tokenized once and the continuation is what follows the context's tokens. The graph has a static
length S: a request is cut from the left to S tokens and padded on the right (a causal model's
logits do not depend on what follows), or packed with others into one window (:mod:`onnxq.evaluation.packing`).

Prompts: PIQA ``"Question: {goal}\\nAnswer:"`` + ``" " + solution``; HellaSwag
``"{activity}: {context}"`` + ``" " + ending`` with lm-eval's text clean-up. The shared HellaSwag file
stores the context as one line, so its second part is not re-capitalised as lm-eval does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError

TASKS = ("piqa", "hellaswag")
FILES = {"piqa": "piqa/valid.jsonl", "hellaswag": "hellaswag/hellaswag_val_full.txt.bz2"}


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass
class TaskResult:
    task: str
    items: int
    acc: float
    acc_norm: float
    seconds: float
    loglik: list[list[float]] = field(default_factory=list, repr=False)


def _find(task: str, path: str | Path | None) -> Path:
    from calib.data import find_data

    if path is not None:
        p = Path(path)
        if not p.exists():
            raise OnnxqError(f"{task} data {p} does not exist", f"pass the task's file ({FILES[task]})")
        return p
    found = find_data(FILES[task])
    if found is None:  # only when the shipped copy was removed
        raise OnnxqError(f"{task} data not found", f"set ONNXQ_DATA to a folder holding {FILES[task]}")
    return found


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load(task: str, path: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items of ``task`` (validation split) from the shared data folder."""
    if task not in TASKS:
        raise OnnxqError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
    from calib.data import open_text

    file = _find(task, path)
    items: list[Item] = []
    if task == "piqa":
        labels = file.with_name(file.name.split(".jsonl")[0] + "-labels.lst").read_text(encoding="utf-8").split()
        with open_text(file) as f:
            for line, label in zip(f, labels, strict=False):
                doc = json.loads(line)
                items.append(Item(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(label)))
                if limit is not None and len(items) >= limit:
                    break
    else:
        with open_text(file) as f:
            lines = f.read().splitlines()
        for i in range(0, len(lines) - 5, 6):
            context, gold, *endings = lines[i : i + 6]
            items.append(Item(_hellaswag_clean(context), tuple(_hellaswag_clean(e) for e in endings), int(gold)))
            if limit is not None and len(items) >= limit:
                break
    return items


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-eval-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    if not context:  # lm-eval conditions on the end-of-text token then
        eot = tok.eos_token_id if tok.eos_token_id is not None else 0
        return [eot], tok(continuation, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


def score(logits: np.ndarray, target: np.ndarray) -> tuple[float, bool]:
    """Sum of log p(target) under ``logits`` ([n, vocab], one row per target token, float64 log-softmax)
    and whether every target is the greedy choice."""
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    logp = x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))
    return float(logp[np.arange(len(target)), target].sum()), bool((x.argmax(-1) == target).all())


def loglikelihood(
    run: Callable[[np.ndarray], np.ndarray], seq_len: int, ctx: Sequence[int], cont: Sequence[int]
) -> tuple[float, bool]:
    """Sum of log p(continuation | context) from one run of a static-length scoring graph, and
    whether every continuation token is the greedy choice (lm-eval's ``is_greedy``)."""
    tokens = (list(ctx) + list(cont))[-seq_len:]
    n = min(len(cont), len(tokens) - 1)  # a continuation longer than the window: its last tokens
    if n <= 0:
        raise OnnxqError("an empty continuation", "check the task data")
    window = np.zeros((1, seq_len), dtype=np.int64)
    window[0, : len(tokens)] = tokens
    logits = run(window)[0][len(tokens) - n - 1 : len(tokens) - 1]
    return score(logits, np.asarray(tokens[len(tokens) - n :]))


def _requests(tok: Any, items: Sequence[Item]) -> Iterator[tuple[int, int, list[int], list[int]]]:
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            ctx, cont = encode_pair(tok, item.context, " " + choice)
            yield i, j, ctx, cont


def evaluate(
    model: str | Path,
    task: str,
    tok: Any,
    *,
    limit: int | None = None,
    ep: str = "cpu",
    path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    pack: bool = True,
) -> TaskResult:
    """acc and acc_norm of ``model`` on the first ``limit`` items of ``task``.

    On ONNX Runtime CPU the requests are packed several to a window (:mod:`onnxq.evaluation.packing`, about
    10x fewer runs); ``pack=False`` (and the QNN EP) runs one request per window.
    """
    from onnxq.device.qnn import make_session

    items = load(task, path, limit)
    requests = list(_requests(tok, items))
    start = time.perf_counter()
    if ep == "cpu" and pack:
        from onnxq.evaluation.packing import PackedSession

        scored = PackedSession(model).loglikelihoods([(c, k) for _, _, c, k in requests], progress)
    else:
        sess: Any = make_session(model, ep)
        inputs = sess.get_inputs()
        if len(inputs) != 1:
            raise OnnxqError(
                f"{model} takes {len(inputs)} inputs; zero-shot scoring feeds input_ids", "use a scoring graph"
            )
        seq_len = int(inputs[0].shape[-1])
        feed = inputs[0].name

        def run(window: np.ndarray) -> np.ndarray:
            return sess.run(None, {feed: window})[0]

        scored = []
        for _, _, ctx, cont in requests:
            scored.append(loglikelihood(run, seq_len, ctx, cont))
            if progress is not None:
                progress(1)
    scores = [[0.0] * len(item.choices) for item in items]
    for (i, j, _, _), (logp, _) in zip(requests, scored, strict=True):
        scores[i][j] = logp
    gold = np.array([item.gold for item in items])
    acc = np.array([int(np.argmax(s)) for s in scores]) == gold
    norm = (
        np.array(
            [
                int(np.argmax([s / max(len(c), 1) for s, c in zip(sc, item.choices, strict=True)]))
                for sc, item in zip(scores, items, strict=True)
            ]
        )
        == gold
    )
    return TaskResult(task, len(items), float(acc.mean()), float(norm.mean()), time.perf_counter() - start, scores)


def requests_count(task: str, limit: int | None, path: str | Path | None = None) -> int:
    """Number of requests ``evaluate`` scores (one per choice): the unit of its progress bar."""
    return sum(len(item.choices) for item in load(task, path, limit))

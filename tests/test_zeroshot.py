"""Zero-shot scoring: the log-likelihoods lm-eval-harness would compute, from a static ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onnxq.cli import main
from onnxq.core.sources import tokenizer_for
from onnxq.device.qnn import cpu_session
from onnxq.evaluation import zeroshot
from tests.tiny import tiny_llama


def test_tasks_load_with_their_gold_labels() -> None:
    piqa = zeroshot.load("piqa", limit=3)
    assert [i.gold for i in piqa] == [0, 1, 1] and piqa[0].context.startswith("Question: How do I ready a guinea pig")
    hs = zeroshot.load("hellaswag", limit=2)
    assert [i.gold for i in hs] == [3, 3] and all(len(i.choices) == 4 for i in hs)
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. he"


def test_loglikelihood_matches_the_torch_model(tiny_model: Path) -> None:
    """The ONNX graph's score of each PIQA choice equals transformers' on the same tokens."""
    tok = tokenizer_for(tiny_model)
    hf = tiny_llama().eval()  # the weights tiny_model was exported from
    sess = cpu_session(tiny_model)
    seq_len = sess.get_inputs()[0].shape[1]
    for item in zeroshot.load("piqa", limit=3):
        for choice in item.choices:
            ctx, cont = zeroshot.encode_pair(tok, item.context, " " + choice)
            assert ctx + cont == tok(item.context + " " + choice, add_special_tokens=False)["input_ids"]
            got, _ = zeroshot.loglikelihood(lambda w: sess.run(None, {"input_ids": w})[0], seq_len, ctx, cont)
            ids = (ctx + cont)[-seq_len:]
            n = min(len(cont), len(ids) - 1)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
            ref = float(sum(logp[len(ids) - n - 1 + k, ids[len(ids) - n + k]] for k in range(n)))
            assert got == pytest.approx(ref, abs=2e-3), (got, ref)


def test_eval_puts_float_and_quantized_side_by_side(
    tiny_model: Path, tiny_w8a16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", str(tiny_model), str(tiny_w8a16 / "model.qdq.onnx"), "--tasks", "piqa", "--limit", "6", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in data["models"]] == argv[1:3]
    for m in data["models"]:
        (task,) = m["tasks"]
        assert task["task"] == "piqa" and task["items"] == 6 and 0 <= task["acc"] <= 1 and 0 <= task["acc_norm"] <= 1
        assert m["results"] == []  # --tasks alone: no perplexity unless --ppl
    assert main(["eval", str(tiny_model), "--tasks", "winogrande", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'winogrande'" in err[0]
    assert np.isfinite(data["models"][0]["tasks"][0]["acc"])


def test_the_harness_scorer_rolls_over_windows_like_the_torch_model(tiny_model: Path) -> None:
    """lm-eval's loglikelihood_rolling on a text longer than the 64-token window, against transformers."""
    from onnxq.evaluation.harness import Scorer

    scorer = Scorer(tiny_model)
    text = zeroshot.load("piqa", limit=3)[0].context * 3
    ids = scorer.tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * scorer.seq_len  # several windows
    hf = tiny_llama().eval()
    bos = scorer.tok.bos_token_id
    ref = 0.0
    step = scorer.seq_len - 1
    with torch.no_grad():
        for start in range(0, len(ids), step):  # the same windowing, scored by torch
            window = ([bos, *ids])[start : start + 1] + ids[start : start + step]
            logp = torch.log_softmax(hf(torch.tensor([window])).logits[0].double(), -1)
            ref += float(sum(logp[k, window[k + 1]] for k in range(len(window) - 1)))
    assert scorer.rolling(text) == pytest.approx(ref, abs=5e-3)
    logp, greedy = scorer.loglikelihood("Question: what", " is")
    assert logp < 0 and isinstance(greedy, bool)
    text = scorer.greedy("The", until=["\n"], max_new_tokens=5)
    assert isinstance(text, str) and "\n" not in text


def _short_requests(seed: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Items like PIQA/HellaSwag in miniature: a context and 2-4 continuations, plus one request
    longer than the window (scored on its own)."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(12):
        ctx = rng.integers(1, 200, int(rng.integers(4, 12))).tolist()
        for _ in range(int(rng.integers(2, 5))):
            requests.append((ctx, rng.integers(1, 200, int(rng.integers(2, 8))).tolist()))
    ctx = rng.integers(1, 200, seq_len // 3).tolist()  # choices that do not fit after one copy of their context
    requests += [(ctx, rng.integers(1, 200, seq_len // 4).tolist()) for _ in range(4)]
    requests.append((rng.integers(1, 200, seq_len).tolist(), rng.integers(1, 200, 6).tolist()))
    return requests


@pytest.mark.parametrize("which", ["float", "w8a16", "w4a8"])
def test_packed_requests_score_as_one_per_window(
    which: str, tiny_model: Path, tiny_w8a16: Path, tmp_path: Path
) -> None:
    """Many requests per window (shared contexts, own positions, block mask) give each request's
    one-per-window log-likelihood: to float rounding on the float graph; on the QDQ graph a
    different summation order may move a value across a rounding boundary, so the bound is looser."""
    from onnxq.evaluation.packing import PackedSession, layout

    model = tiny_model if which == "float" else tiny_w8a16 / "model.qdq.onnx"
    if which == "w4a8":  # 8-bit MatMul inputs, K and Q after RoPE included
        from onnxq.stages.pipeline import quantize

        model = quantize(tiny_model, tmp_path / "w4a8", preset="w4a8", calib="wikitext2-valid", windows=4).output
        model = model / "model.qdq.onnx"
    packed = PackedSession(model)
    requests = _short_requests(0, packed.seq_len)
    windows, alone = layout(requests, packed.seq_len)
    assert packed.packable and alone == [len(requests) - 1] and len(windows) <= len(requests) // 4
    assert sum(len(w.picks) for w in windows) == len(requests) - 1
    long_ctx = requests[-2][0]  # its 4 choices do not fit after one copy: two copies, two windows
    copies = sum(
        1
        for w in windows
        for at in range(packed.seq_len - len(long_ctx) + 1)
        if w.ids[0, at : at + len(long_ctx)].tolist() == long_ctx and w.positions[0, at] == 0
    )
    assert copies == 2
    sess = cpu_session(model)
    causal = np.tril(np.ones((packed.seq_len,) * 2, dtype=bool))[None, None]
    tokens = requests[0][0] + requests[0][1]
    window = np.zeros((1, packed.seq_len), dtype=np.int64)
    window[0, : len(tokens)] = tokens
    plain = sess.run(None, {"input_ids": window})[0]
    assert np.array_equal(packed.run_plain(window), plain)  # the rewrite alone changes nothing
    assert np.array_equal(packed.run(window, np.arange(packed.seq_len)[None], causal)[None], plain)
    got = packed.loglikelihoods(requests)
    ref = [
        zeroshot.loglikelihood(lambda w: sess.run(None, {"input_ids": w})[0], packed.seq_len, c, k) for c, k in requests
    ]
    diff = np.abs([g[0] - r[0] for g, r in zip(got, ref, strict=True)])
    assert diff.max() < (1e-4 if which == "float" else 5e-2), diff.max()
    assert np.mean([g[1] == r[1] for g, r in zip(got, ref, strict=True)]) >= 0.95


def test_the_harness_scorer_packs_a_batch_of_requests(tiny_model: Path) -> None:
    """lm-eval hands the adapter all requests at once; packed, they score as they do one by one."""
    from onnxq.evaluation.harness import Scorer

    scorer = Scorer(tiny_model)
    pairs = [(item.context, " " + c) for item in zeroshot.load("piqa", limit=4) for c in item.choices]
    sess = cpu_session(tiny_model)
    ref = [
        zeroshot.loglikelihood(
            lambda w: sess.run(None, {"input_ids": w})[0], scorer.seq_len, *zeroshot.encode_pair(scorer.tok, *p)
        )[0]
        for p in pairs
    ]
    got = [logp for logp, _ in scorer.loglikelihoods(pairs)]
    assert got == pytest.approx(ref, abs=1e-4)
    assert scorer.loglikelihood(*pairs[0])[0] == pytest.approx(ref[0], abs=1e-4)


def test_a_graph_with_an_unknown_positional_constant_is_not_packed(tiny_model: Path, tmp_path: Path) -> None:
    """Packing rewires the mask and the RoPE tables; another per-position constant would stay tied to
    positions 0..S-1 and give wrong scores, so such a graph is scored one request per window."""
    import onnx_ir as ir

    from onnxq.core import ir as oir
    from onnxq.evaluation.packing import PackedSession
    from rewrites.positions import expose_positions

    assert expose_positions(oir.load(tiny_model)).counts == {"masks": 1, "tables": 2}
    model = oir.load(tiny_model)
    seq_len = model.graph.inputs[0].shape[1]
    logits = model.graph.outputs[0]
    bias = oir.add_initializer(model.graph, "position_bias", np.zeros((1, seq_len, 1), dtype=np.float32))
    add = ir.node("Add", [logits, bias])
    model.graph.append(add)
    add.outputs[0].name = "biased"
    model.graph.outputs[0] = add.outputs[0]
    oir.save(model, tmp_path / "odd.onnx")
    result = expose_positions(oir.load(tmp_path / "odd.onnx"))
    assert result.counts == {"masks": 0, "tables": 0} and result.notes == ("position_bias",)
    session = PackedSession(tmp_path / "odd.onnx")
    assert not session.packable
    requests = _short_requests(1, seq_len)[:5]
    ref = [zeroshot.loglikelihood(session.run_plain, seq_len, c, k) for c, k in requests]
    assert session.loglikelihoods(requests) == ref

"""KV-cache graphs: prefill and decode reproduce the scoring graph, and generation follows from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxq.errors import OnnxqError
from onnxq.export_kv import export_kv_model, step_mask
from onnxq.generate import Stepper, generate
from onnxq.qnn import cpu_session
from tests.tiny import tiny_llama

TOL = 1e-4  # float32 noise between two graphs of the same model


@pytest.fixture(scope="module")
def kv_folder(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prefill (chunk 8) and decode graphs of the same tiny Llama as ``tiny_model``, 40 cache slots."""
    import shutil

    folder = tmp_path_factory.mktemp("kv") / "tiny-kv"
    result = export_kv_model(tiny_llama(), folder, chunk=8, context=40, check_ids=np.arange(21) * 7 % 384)
    assert result.max_abs_diff < TOL
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / f, folder / f)
    return folder


def test_prefill_and_decode_match_the_scoring_graph(kv_folder: Path, tiny_model: Path, eval_ids: np.ndarray) -> None:
    ids = eval_ids[0]
    scoring = cpu_session(tiny_model)
    ref = scoring.run(None, {"input_ids": ids.reshape(1, -1)})[0][0]
    stepper = Stepper(kv_folder)
    got = [stepper.step(ids[:19])]  # chunks of 8, 8 and 3 (padded) through prefill
    got += [stepper.step([t]) for t in ids[19:30]]  # then one token at a time through decode
    got = np.concatenate(got)
    assert got.shape == (30, ref.shape[-1])
    np.testing.assert_allclose(got, ref[:30], atol=TOL)


def test_greedy_generation_equals_rerunning_the_scoring_graph(kv_folder: Path, tiny_model: Path) -> None:
    from onnxq.sources import tokenizer_for

    tok = tokenizer_for(kv_folder / "prefill.onnx")
    prompt = "The capital of France is"
    streamed: list[str] = []
    out = generate(kv_folder, prompt, max_new_tokens=10, tokenizer=tok, on_token=streamed.append)
    # the reference: no cache, the whole sequence through the 64-token scoring graph at every step
    scoring = cpu_session(tiny_model)
    ids = list(tok(prompt)["input_ids"])
    expected = []
    for _ in range(len(out.tokens)):
        window = np.zeros((1, 64), dtype=np.int64)
        window[0, : len(ids)] = ids
        nxt = int(np.argmax(scoring.run(None, {"input_ids": window})[0][0, len(ids) - 1]))
        expected.append(nxt)
        ids.append(nxt)
    assert out.tokens == expected and len(out.tokens) == 10
    assert "".join(streamed) == out.text and out.decode_tps > 0 and out.prefill_tps > 0


def test_the_mask_sees_the_past_and_the_chunk_causally() -> None:
    m = step_mask(position=3, valid=2, chunk=4, slots=6, mask_value=-100.0)[0, 0]
    visible = (m == 0).astype(int)
    assert visible[:, :6].tolist() == [[1, 1, 1, 0, 0, 0]] * 4  # slots 0..2 hold positions 0..2
    assert visible[:2, 6:].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]  # causal inside the chunk


def test_a_full_context_is_refused(kv_folder: Path) -> None:
    stepper = Stepper(kv_folder)
    stepper.step(np.arange(40) % 300)
    with pytest.raises(OnnxqError, match="context is full"):
        stepper.step([5])


def test_generate_cli_json_and_the_quantizer_refusal(
    kv_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from onnxq.cli import main

    argv = ["generate", str(kv_folder), "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == 4 and data["decode_tokens_per_s"] > 0
    out = tmp_path / "q"
    assert main(["quantize", str(kv_folder / "prefill.onnx"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KV-cache step graph" in err[0] and not out.exists()

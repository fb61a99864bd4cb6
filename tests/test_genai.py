"""`onnxq package`: the KV-cache pair in a folder that onnxruntime-genai loads and runs with its own loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from onnxq.cli import main
from onnxq.core.errors import OnnxqError
from onnxq.core.tokenizer import FileTokenizer
from onnxq.device import genai
from onnxq.device.generate import generate
from tests.conftest import quantized

og = pytest.importorskip("onnxruntime_genai")

#: 7, 16 and 30 tokens of the tiny tokenizer: within one chunk of 8, exactly two chunks, the last of four padded
PROMPTS = ("He was born in", "The capital of France is Paris", "The game 's battle system , the BliTZ system , is")
CHUNK, CONTEXT = 8, 40  # of the kv_folder fixture


@pytest.fixture(scope="module")
def kv_w4a8(kv_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized(kv_folder, tmp_path_factory, "w4a8", windows=2)


@pytest.mark.parametrize("pair", ["kv_folder", "kv_w8a16", "kv_w4a8"])
def test_genai_greedy_gives_the_tokens_of_onnxq_generate(
    pair: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    folder = request.getfixturevalue(pair)
    result = genai.package(folder, tmp_path / "genai")
    assert result.loaded_by == og.__version__
    assert result.pad_id == 384  # the tiny tokenizer has no unused special token: vocab_size, clamped in the graph
    for prompt, length in zip(PROMPTS, (7, 16, 30), strict=True):
        assert len(FileTokenizer(folder)(prompt)["input_ids"]) == length
        ours = generate(folder, prompt, max_new_tokens=12).tokens
        theirs = genai.generate(tmp_path / "genai", prompt, max_new_tokens=12).tokens
        # genai counts the padded prompt toward the context, so it may stop earlier; token ids: exact
        padded = -(-length // CHUNK) * CHUNK
        assert len(theirs) == min(12, CONTEXT - padded), prompt
        assert theirs == ours[: len(theirs)], prompt


def test_the_compiled_pair_runs_in_genai_on_the_htp(kv_w8a16: Path, tmp_path: Path) -> None:
    from onnxq.device.compile import compile_model

    compile_model(kv_w8a16, tmp_path / "htp")
    result = genai.package(tmp_path / "htp", tmp_path / "genai")
    assert result.compiled and result.loaded_by == og.__version__
    assert {"prefill_ctx_qnn.bin", "decode_ctx_qnn.bin", "prefill.onnx", "decode.onnx"} <= set(result.files)
    config = json.loads((tmp_path / "genai" / genai.CONFIG).read_text(encoding="utf-8"))
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [genai.qnn_provider()]
    for prompt in PROMPTS[::2]:
        ours = generate(kv_w8a16, prompt, max_new_tokens=6, ep="qnn").tokens
        assert genai.generate(tmp_path / "genai", prompt, max_new_tokens=6, ep="qnn").tokens == ours, prompt
    with pytest.raises(OnnxqError, match="compiled for the HTP"):
        genai.generate(tmp_path / "genai", PROMPTS[0], ep="cpu")


def test_the_wrapper_computes_what_the_host_feeds(kv_w8a16: Path) -> None:
    """Positions, mask and the cache write, for a step that genai places at slot 10 (chunk of 8)."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxq.core import ir as oir
    from onnxq.core.steps import read_shape, step_inputs

    chunk, shape, mask_value = read_shape(kv_w8a16 / "prefill.qdq.onnx")
    wrapped = genai.wrap(oir.load(kv_w8a16 / "prefill.qdq.onnx"), chunk, shape, mask_value, 384)
    for name in ("position_ids", "attention_mask"):
        wrapped.graph.outputs.append(next(v for n in wrapped.graph for v in n.outputs if v.name == name))
    sess = ort.InferenceSession(ir.to_proto(wrapped).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    past = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in shape.empty().items()}
    ids = np.arange(chunk, dtype=np.int64).reshape(1, -1) + 5
    feeds = {
        "input_ids": ids,
        "past_seq_len": np.array([[10 + chunk - 1]], np.int32),
        "total_seq_len": np.array([40], np.int32),
    }
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, **past}), strict=True))
    host = step_inputs(ids[0], 10, chunk, shape, mask_value)  # a full chunk: no padding rows
    assert np.array_equal(out["position_ids"], host["position_ids"])
    assert np.array_equal(out["attention_mask"], host["attention_mask"])
    key = out["present.0.key"]
    assert np.array_equal(key[:, :, :10], past["past_key_0"][:, :, :10])
    assert np.array_equal(key[:, :, 18:], past["past_key_0"][:, :, 18:])
    assert not np.array_equal(key[:, :, 10:18], past["past_key_0"][:, :, 10:18])


def test_the_pad_is_an_id_no_prompt_holds(kv_folder: Path, tmp_path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer

    folder = tmp_path / "kv"
    shutil.copytree(kv_folder, folder)
    assert genai._pad_id(folder, 384) == 384  # no spare special token: one past the vocabulary
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|spare|>", special=True), AddedToken("<|turn|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    spare, turn = tok.token_to_id("<|spare|>"), tok.token_to_id("<|turn|>")
    assert genai._pad_id(folder, 512) == turn  # the highest unused special token
    (folder / "chat_template.jinja").write_text("{{ '<|turn|>' + message }}", encoding="utf-8")
    assert genai._pad_id(folder, 512) == spare  # a token the chat template writes can occur in a prompt


def _one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_what_genai_cannot_load_is_refused_in_one_line(
    tiny_w8a16: Path, kv_w8a16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line(["package", str(tiny_w8a16), "-o", str(tmp_path / "a")], capsys)
    assert "has no prefill/decode pair (model.qdq.onnx)" in line and "onnxq export --kv-cache" in line
    line = _one_line(["package", str(tiny_w8a16 / "model.qdq.onnx"), "-o", str(tmp_path / "b")], capsys)
    assert "single graph without a KV cache" in line
    line = _one_line(["package", str(kv_w8a16), "-o", str(kv_w8a16), "--overwrite"], capsys)
    assert "would overwrite the input" in line
    (tmp_path / "c").mkdir()
    line = _one_line(["package", str(kv_w8a16), "-o", str(tmp_path / "c")], capsys)
    assert "already exists" in line
    line = _one_line(["generate", str(kv_w8a16 / "nothing"), "--prompt", "x"], capsys)
    assert "no prefill/decode graphs" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

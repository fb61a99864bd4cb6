"""onnxq compile: HTP context binaries through the QNN EP, and the QAIRT hand-over (SDK call skipped)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.cli import main
from onnxq.device.compile import HOST, compile_model
from onnxq.device.qnn import cpu_session, session
from onnxq.stages import aimet
from onnxq.stages.split import split
from rewrites.canonical import decompose_rms_norm


def test_ort_toolchain_writes_a_context_binary_that_reloads(
    tiny_w8a16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "htp"
    assert main(["compile", str(tiny_w8a16 / "model.qdq.onnx"), "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["files"]["model_ctx.onnx"] > 0 and data["files"]["model_ctx_qnn.bin"] > 10_000
    assert data["rerun_max_abs_error"] == 0.0  # the reloaded binary computes exactly what was compiled
    assert (out / "tokenizer.json").exists()  # generate/eval find the tokenizer beside the binary
    ctx = ir.load(out / "model_ctx.onnx")
    assert [n.op_type for n in ctx.graph] == ["EPContext"]  # the whole graph is one HTP context
    # and it is the QDQ model: the same logits as the QDQ model compiled afresh on the HTP
    ids = (np.arange(64) % 50 + 3).reshape(1, -1)
    ref = session(tiny_w8a16 / "model.qdq.onnx", record_assignment=False)
    got = session(out / "model_ctx.onnx", record_assignment=False)
    feed = ref.get_inputs()[0].name
    np.testing.assert_array_equal(got.run(None, {feed: ids})[0], ref.run(None, {feed: ids})[0])


def test_qairt_without_an_sdk_says_what_to_install(
    tiny_w8a16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QAIRT_SDK_ROOT", raising=False)
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    out = tmp_path / "qairt"
    assert main(["compile", str(tiny_w8a16 / "model.qdq.onnx"), "-o", str(out), "--toolchain", "qairt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QAIRT_SDK_ROOT" in err[0] and "install the QAIRT SDK" in err[0]
    assert not out.exists()


def test_qairt_hands_over_float_model_encodings_and_exact_commands(
    tiny_w8a8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdk = tmp_path / "qairt-2.40"
    sdk.mkdir()
    monkeypatch.setenv("QAIRT_SDK_ROOT", str(sdk))
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    ran: list[tuple[list[str], Path]] = []
    out = tmp_path / "qairt"
    qdq = tiny_w8a8 / "model.qdq.onnx"
    record = lambda c, cwd: ran.append((list(c), cwd))  # noqa: E731 - the SDK call, skipped
    result = compile_model(qdq, out, toolchain="qairt", soc_model="60", runner=record)
    tools = f"{sdk}/bin/{HOST}"
    assert [c for c, _ in ran] == [
        [
            f"{tools}/qnn-onnx-converter", "--input_network", "model.float.onnx",
            "--quantization_overrides", "model.encodings", "--input_list", "input_list.txt",
            "--act_bitwidth", "8", "--weights_bitwidth", "8", "--bias_bitwidth", "32",
            "--use_per_channel_quantization", "--output_path", "qnn/model.cpp",
        ],
        [f"{tools}/qnn-model-lib-generator", "-c", "qnn/model.cpp", "-b", "qnn/model.bin", "-o", "qnn/lib", "-t", HOST],
        [
            f"{tools}/qnn-context-binary-generator", "--backend", f"{sdk}/lib/{HOST}/libQnnHtp.so",
            "--model", f"qnn/lib/{HOST}/libmodel.so", "--config_file", "htp_config.json",
            "--binary_file", "model_htp", "--output_dir", ".",
        ],
    ]  # fmt: skip
    assert all(cwd.parent == out.parent for _, cwd in ran) and result.output == out
    # the float model: standard ONNX ops only, and it computes what the QDQ model's float graph does
    float_model = ir.load(out / "model.float.onnx")
    ops = {n.op_type for n in float_model.graph}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "SimplifiedLayerNormalization"}
    fused = split(ir.load(qdq)).model
    ir.save(fused, tmp_path / "fused.onnx")
    ids = (np.arange(64) % 50 + 3).reshape(1, -1)
    a, b = cpu_session(out / "model.float.onnx"), cpu_session(tmp_path / "fused.onnx")
    np.testing.assert_allclose(a.run(None, {"input_ids": ids})[0], b.run(None, {"input_ids": ids})[0], atol=1e-4)
    # the encodings: every tensor they name exists in the float model, and they are the QDQ model's
    acts, params = aimet.read_split(out / "model.encodings")
    names = {v.name for v in float_model.graph.inputs} | set(float_model.graph.initializers)
    names |= {o.name for n in float_model.graph for o in n.outputs}
    assert set(acts) | set(params) <= names
    parts = split(ir.load(qdq))
    assert set(acts) == set(parts.activations) and set(params) == set(parts.params)
    # the calibration input the converter is pointed at
    name, raw = (out / "input_list.txt").read_text().strip().split(":=")
    assert name == "input_ids" and (out / raw).stat().st_size == 64 * 8
    backend = json.loads((out / "htp_backend.json").read_text())
    assert backend["devices"] == [{"soc_model": 60}]


def test_decomposed_rms_norm_matches_the_fused_op(tiny_model: Path, tmp_path: Path) -> None:
    from onnxq.stages.prepare import prepare

    fused = prepare(ir.load(tiny_model), rotate="none").model
    ir.save(fused, tmp_path / "fused.onnx")
    result = decompose_rms_norm(prepare(ir.load(tiny_model), rotate="none").model)
    assert result.counts["RMSNorms decomposed"] == 5  # 2 layers x 2 + final norm
    ir.save(result.model, tmp_path / "decomposed.onnx")
    ids = (np.arange(64) % 50 + 3).reshape(1, -1)
    a, b = cpu_session(tmp_path / "fused.onnx"), cpu_session(tmp_path / "decomposed.onnx")
    np.testing.assert_allclose(a.run(None, {"input_ids": ids})[0], b.run(None, {"input_ids": ids})[0], atol=1e-4)

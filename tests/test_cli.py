"""The CLI: bad input gives one line naming the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxq.cli import main


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model")
    line = _error_line(capsys, ["quantize", str(bad), "-o", str(tmp_path / "out")])
    assert "is not an ONNX model" in line and "pass the .onnx file" in line


def test_dynamic_shape(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx_ir as ir

    model = ir.load(tiny_model)
    model.graph.inputs[0].shape = ir.Shape(["batch", "sequence"])
    dyn = tmp_path / "dynamic.onnx"
    ir.save(model, dyn)
    line = _error_line(capsys, ["quantize", str(dyn), "-o", str(tmp_path / "out")])
    assert "dynamic shape" in line and "--seq-len" in line


def test_empty_calibration_file(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "calib.txt"
    empty.write_text("\n\n")
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", str(tmp_path / "out"), "--calib", str(empty)])
    assert "holds no text" in line


def test_output_exists(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", str(out)])
    assert "already exists" in line and "--overwrite" in line


def test_output_would_overwrite_input(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", str(tiny_model.parent), "--overwrite"])
    assert "would overwrite the input" in line


def test_unknown_preset(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--preset", "w3a3"])
    assert "unknown preset 'w3a3'" in line and "w8a16" in line


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["eval", str(tmp_path / "nope.onnx")])
    assert "does not exist" in line


def test_quantize_and_eval_json(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(tiny_model),
                "-o",
                str(out),
                "--preset",
                "w8a8",
                "--calib",
                "wikitext2-valid",
                "--windows",
                "2",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "w8a8" and summary["counts"]["int8 activations"] > 0
    assert sorted(summary["files"]) == sorted(p.name for p in out.iterdir())
    e = summary["eval"]  # the summary's float-vs-quantized perplexity, on the same windows
    assert e["windows"] == 4 and 1 < e["float"] < 1e4 and 1 < e["quantized"] < 1e4
    assert main(["eval", str(out / "model.qdq.onnx"), "--windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["dataset"] == "wikitext2" and 1 < result["ppl"] < 1e4


def test_learn_from_the_cli_with_the_default_windows(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "learned"
    argv = ["quantize", str(tiny_model), "-o", str(out), "--preset", "w4a8", "--calib", "wikitext2-valid"]
    assert main([*argv, "--learn", "--steps", "1", "--samples", "2", "--no-report", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["windows"] == 64  # GPTQ rounds 4-bit weights: 64 windows by default
    assert summary["learning"]["config"]["samples"] == 2


def test_progress_ticks_carry_a_note_after_the_bar() -> None:
    from onnxq.cli import _Progress

    progress = _Progress(True)
    tick = progress("learning (layers)", 2)
    tick(1, "layer 0 error 0.1 -> 0.05")
    tick(1)
    assert progress.bars[0].n == 2 and progress.bars[0].postfix == "layer 0 error 0.1 -> 0.05"
    progress.close()


def test_an_empty_model_to_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    line = _error_line(capsys, ["eval", str(empty), "--windows", "1"])
    assert "is not an ONNX model" in line


@pytest.mark.parametrize("argv", [["eval", "--windows", "0"], ["validate", "--windows", "-1"]])
def test_a_count_below_one(argv: list[str], tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, [argv[0], str(tiny_model), *argv[1:]])
    assert f"--windows {argv[2]} is not a positive count" in line and "--windows 1 or more" in line


def test_a_corrupt_gguf_and_a_config_without_model_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(range(256)) * 4)
    line = _error_line(capsys, ["export", str(gguf), "-o", str(tmp_path / "a.onnx")])
    assert "is not a GGUF file" in line
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    line = _error_line(capsys, ["export", str(folder), "-o", str(tmp_path / "b.onnx")])
    assert "has no 'model_type'" in line and "save_pretrained" in line


def test_an_unwritable_output_is_refused_before_the_work(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", str(blocker / "out")])
    assert "is a file, not a folder" in line
    if os.geteuid() == 0:  # root writes through permission bits: take a folder no one can write
        readonly = Path("/proc")
    else:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
    line = _error_line(capsys, ["export", "-o", str(readonly / "x" / "model.onnx")])
    assert "is not writable" in line and "choose an output path" in line


def test_a_precision_map_width_given_as_text(
    tmp_path: Path, tiny_model: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pm = json.loads((tiny_w8a8 / "precision_map.json").read_text())
    name = next(iter(pm["points"]))
    pm["points"][name]["bits"] = "16"
    edited = tmp_path / "map.json"
    edited.write_text(json.dumps(pm))
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--precision-map", str(edited)])
    assert "has bits '16', a str, not a number" in line and '"bits": 16 (no quotes)' in line


def test_check_on_a_float_model(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["check", str(tiny_model)])
    assert "not a QDQ model" in line and "onnxq quantize" in line


def test_check_finds_an_unquantized_tensor_in_a_graph_without_types(
    tmp_path: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    proto = onnx.load(tiny_w8a8 / "model.qdq.onnx")
    del proto.graph.value_info[:]  # as some exporters and hand edits leave it
    producer = {o: n for n in proto.graph.node for o in n.output}
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul")
    name = matmul.input[0]
    while producer[name].op_type == "DequantizeLinear":  # back through the 8-bit copy and the 16-bit pair
        name = producer[producer[name].input[0]].input[0]
    matmul.input[0] = name  # the float tensor, around its Q/DQ pairs
    path = tmp_path / "bypassed.onnx"
    onnx.save(proto, path)
    assert main(["check", str(path), "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)["findings"]
    assert any(f["rule"] == "unquantized" and f["tensor"] == name for f in findings), findings


def test_eval_json_on_the_htp_is_json_alone(tiny_w8a8: Path) -> None:
    """The QNN library prints to file descriptor 1 when it loads: a fresh process sees it."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "onnxq", "eval", str(tiny_w8a8 / "model.qdq.onnx"), "--ep", "qnn"]
    proc = subprocess.run([*argv, "--windows", "1", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["results"][0]["windows"] == 1


def test_quiet_still_prints_the_result(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_model), "--windows", "1", "-q"]) == 0
    captured = capsys.readouterr()
    assert "wikitext2 ppl" in captured.out and not captured.err


def test_validate_refuses_an_existing_context_folder(
    tiny_w8a8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "kept.txt").write_text("a user's file")
    assert main(["validate", str(tiny_w8a8 / "model.qdq.onnx"), "--context", str(ctx)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert [p.name for p in ctx.iterdir()] == ["kept.txt"]
    assert main(["validate", str(tiny_w8a8 / "model.qdq.onnx"), "--context", str(tiny_w8a8), "--overwrite"]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    line = _error_line(capsys, ["validate", str(tiny_w8a8 / "model.qdq.onnx"), "--overwrite"])
    assert "--overwrite replaces a --context folder, and none is given" in line


def test_every_command_has_examples_that_parse(capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    from onnxq.cli import EXAMPLES, build_parser

    parser = build_parser()
    for command, lines in EXAMPLES.items():
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert capsys.readouterr().out.rstrip().endswith(lines[-1]), command
        for line in lines:
            args = parser.parse_args(shlex.split(line, comments=True)[1:])
            assert args.command == command, line


def test_a_truncated_model_to_each_command_that_reads_one(
    tmp_path: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = tmp_path / "model.qdq.onnx"
    cut.write_bytes((tiny_w8a8 / "model.qdq.onnx").read_bytes()[:1000])
    for argv in (["eval"], ["validate"], ["check"], ["compile", "-o", str(tmp_path / "htp")]):
        line = _error_line(capsys, [argv[0], str(cut), *argv[1:]])
        assert "is not an ONNX model" in line, argv


def test_weights_file_missing_or_cut(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    model = tmp_path / "m" / "model.onnx"
    model.parent.mkdir()
    proto = onnx.load(str(tiny_model))
    onnx.save(proto, str(model), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    for argv in (["eval"], ["quantize", "-o", str(tmp_path / "q")], ["compile", "-o", str(tmp_path / "htp")]):
        assert "is truncated" in _error_line(capsys, [argv[0], str(model), *argv[1:]]), argv
    data.unlink()
    for argv in (["eval"], ["quantize", "-o", str(tmp_path / "q")], ["check"]):
        line = _error_line(capsys, [argv[0], str(model), *argv[1:]])
        assert "keeps its weights in model.onnx.data, which is not beside it" in line, argv


def test_a_model_that_does_not_take_token_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    for command in ("eval", "validate"):
        assert "does not take token ids" in _error_line(capsys, [command, str(path), "--tokenizer", str(tmp_path)])


def test_unreadable_text_maps_and_tokenizers(
    tmp_path: Path, tiny_model: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    out = str(tmp_path / "o")
    assert "as text" in _error_line(capsys, ["quantize", str(tiny_model), "-o", out, "--calib", str(binary)])
    assert "as text" in _error_line(capsys, ["eval", str(tiny_model), "--ppl", str(binary)])
    line = _error_line(capsys, ["quantize", str(tiny_model), "-o", out, "--precision-map", str(tmp_path)])
    assert "cannot read precision map" in line
    qdq = str(tiny_w8a8 / "model.qdq.onnx")
    assert "cannot read encodings" in _error_line(capsys, ["check", qdq, "--encodings", str(binary)])
    line = _error_line(capsys, ["eval", str(tiny_model), "--tokenizer", str(tmp_path / "no" / "such")])
    assert "could not load the tokenizer" in line
    folder = tmp_path / "bad-config"
    folder.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (folder / name).write_bytes((tiny_model.parent / name).read_bytes())
    (folder / "tokenizer_config.json").write_text("{not json")
    line = _error_line(capsys, ["eval", str(folder / "model.onnx"), "--windows", "1"])
    assert "tokenizer_config.json is not valid JSON" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([str(Path("no") / "such.onnx")], "does not exist"),
        (["--ppl", "wikitext2-valid", "no-such-text"], "'no-such-text' not found"),
        (["--tasks", "piqa,nosuch"], "unknown task 'nosuch'"),
        (["--seq-len", "0"], "--seq-len 0 is not a positive count"),
    ],
)
def test_eval_checks_everything_before_it_scores(
    extra: list[str], message: str, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line, with no progress bar before it: the first model is not scored first."""
    assert message in _error_line(capsys, ["eval", str(tiny_model), *extra, "--windows", "1"])


def test_lengths_and_counts_are_checked_before_any_model_is_loaded(
    tmp_path: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kv = str(tmp_path / "kv")
    line = _error_line(capsys, ["export", "--kv-cache", "-o", kv, "--chunk", "600", "--context", "512"])
    assert "--chunk 600 must be between 2 and --context 512" in line
    line = _error_line(capsys, ["export", "--kv-cache", "-o", kv, "--chunk", "0"])
    assert "--chunk 0 is not a positive count" in line
    for argv in (["export", "-o", kv + ".onnx"], ["export", "--kv-cache", "-o", kv]):
        assert "is not a finite negative number" in _error_line(capsys, [*argv, "--mask-value", "nan"])
    line = _error_line(capsys, ["compile", str(tiny_w8a8 / "model.qdq.onnx"), "-o", kv, "--parts", "0"])
    assert "--parts 0 is not a positive count" in line


def test_diff_with_its_models_swapped(tiny_model: Path, tiny_w8a8: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["diff", str(tiny_w8a8 / "model.qdq.onnx"), str(tiny_model)])
    assert "is not a QDQ model" in line and "onnxq diff FLOAT QDQ" in line

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

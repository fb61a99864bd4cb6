"""The options object is the recipe: validated once, written beside every output, replayed to the same bytes."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest

from onnxq.cli import main
from onnxq.core.errors import OnnxqError
from onnxq.core.options import LearnConfig, QuantizeOptions, read_recipe, recipe_toml


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_replayed_recipe_gives_the_same_bytes(tiny_model: Path, tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    argv = ["quantize", str(tiny_model), "--preset", "w4a8", "--calib", "wikitext2-valid", "--windows", "4"]
    assert main([*argv, "--budget", "0.25", "-o", str(first), "--no-report", "-q", "--eval-windows", "0"]) == 0
    recipe = tomllib.loads((first / "recipe.toml").read_text())
    opts = recipe["options"]
    # every default resolved: GPTQ for 4-bit weights, the family's LPBQ block and outlier split, the model's length
    assert opts["windows"] == 4 and opts["weight_method"] == "gptq" and opts["gptq_sweeps"] == 3
    assert opts["weight_block"] == 16 and opts["split_outliers"] == 16.0 and opts["seq_len"] == 64
    assert opts["online_hadamard"] == ["r4"]
    assert opts["budget"] == 0.25 and "learn" not in opts and "precision_map" not in opts
    assert recipe["inputs"]["model.onnx sha256"] == _digest(tiny_model)
    assert len(recipe["inputs"]["calibration tokens sha256"]) == 64
    assert set(recipe["versions"]) >= {"onnxq", "torch", "onnxruntime", "onnxruntime-qnn", "onnx"}
    replay = ["quantize", str(tiny_model), "--recipe", str(first / "recipe.toml"), "-o", str(again)]
    assert main([*replay, "--no-report", "-q", "--eval-windows", "0"]) == 0
    assert _digest(again / "model.qdq.onnx") == _digest(first / "model.qdq.onnx")
    assert (again / "recipe.toml").read_text() == (first / "recipe.toml").read_text()


@pytest.mark.parametrize(
    ("fixture", "method", "online", "split"),
    [("tiny_w8a16", "mse", [], 0.0), ("tiny_w8a8", "gptq", ["r4"], 16.0)],
)
def test_each_preset_defaults_to_its_best_measured_recipe(
    fixture: str, method: str, online: list[str], split: float, request: pytest.FixtureRequest
) -> None:
    """--preset alone: W8A8 gets the outlier split, R4 and GPTQ; W8A16 needs none of them."""
    opts = tomllib.loads((request.getfixturevalue(fixture) / "recipe.toml").read_text())["options"]
    assert (opts["weight_method"], opts["online_hadamard"], opts["split_outliers"]) == (method, online, split)


def test_online_hadamard_none_turns_the_default_off(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_model), "--preset", "w8a8", "--calib", "wikitext2-valid", "--windows", "2"]
    assert main([*argv, "--online-hadamard", "none", "-o", str(out), "--no-report", "-q", "--eval-windows", "0"]) == 0
    assert tomllib.loads((out / "recipe.toml").read_text())["options"]["online_hadamard"] == []


def test_the_recipe_round_trips_with_learning(tmp_path: Path) -> None:
    options = QuantizeOptions(
        preset="w4a8",
        windows=8,
        online_hadamard=("r4",),
        learn=LearnConfig(steps=3, samples=2),
        precision_map="map.json",
    )
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_toml(options, {"model.onnx sha256": "0" * 64}))
    recipe = read_recipe(path)
    assert recipe.options == options and recipe.inputs == {"model.onnx sha256": "0" * 64}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"weight_block": 24}, "--weight-block 24 is not a power of two"),
        ({"windows": 0}, "--windows 0 is not a positive count"),
        ({"split_outliers": 0.5}, "--split-outliers 0.5 is not above 1"),
        ({"budget": 1.5}, "--budget 1.5 is not a share"),
        ({"online_hadamard": ("r5",)}, "--online-hadamard 'r5' is not known"),
        ({"preset": "w3a3"}, "unknown preset"),
        # a recipe's values of the wrong type, and numbers no run can use
        ({"preset": 5}, "--preset 5 is not text"),
        ({"seed": "x", "rotate": "none"}, "--seed 'x' is not a whole number"),
        ({"windows": True}, "--windows True is not a whole number"),
        ({"online_hadamard": "r4"}, "online_hadamard 'r4' is not a list"),
        ({"mask_value": float("nan")}, "--mask-value nan is not a finite number"),
        ({"split_outliers": float("nan")}, "--split-outliers nan is not a finite number"),
        ({"seed": -1}, "--seed -1 is negative"),
        ({"mask_value": 5.0}, "--mask-value 5.0 is not a finite negative number"),
        ({"learn": {"lr": float("nan")}}, "--lr nan is not a finite number"),
        ({"learn": {"e2e_lr": -1.0}}, "--e2e-lr -1.0 is not a positive rate"),
        ({"learn": {"e2e_groups": "kv"}}, "e2e_groups 'kv' is not a list"),
    ],
)
def test_options_are_validated_once_when_built(changes: dict, message: str) -> None:
    with pytest.raises(OnnxqError, match=message):
        QuantizeOptions(**changes)


def test_recipe_with_other_options_is_one_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_toml(QuantizeOptions(), {}))
    argv = ["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--recipe", str(recipe), "--preset", "w8a8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset would change it" in err
    for flag in (["--e2e-steps", "5"], ["--e2e-groups", "kv"], ["--holdout", "2"], ["--learn"]):
        assert main([*argv[:-2], *flag]) == 2
        assert f"{flag[0]} would change it" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    for body, message in [
        ('[options]\npreset = "w8a8"\nwindow = 4\n', "unknown options window"),
        ('inputs = 5\n[options]\npreset = "w8a8"\n', "[inputs] and [versions] are tables"),
        ("[options]\npreset = 5\n", "preset 5 is not text: edit that value in the recipe"),
        ("[options]\nseed = -1\n", "seed -1 is negative: edit that value in the recipe"),
    ]:
        bad.write_text("recipe = 1\n" + body)
        assert main(["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--recipe", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--recipe", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err

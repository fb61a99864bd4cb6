"""A pair compiled in parts at decoder-layer boundaries computes what the whole graphs compute."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxq.core.errors import OnnxqError
from onnxq.core.steps import PARTS_SUFFIX, read_parts
from onnxq.device.generate import Stepper, generate
from onnxq.device.parts import Part, PartedSession, layer_bytes, open_graph, plan_parts, split_graph
from onnxq.device.qnn import cpu_session

LAYERS = 4


@pytest.fixture(scope="module")
def four_layer_pair(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer tiny pair, quantized w8a8 (outlier split and R4 by default)."""
    from onnxq.stages.export_kv import export_kv_model
    from onnxq.stages.pipeline import quantize
    from tests.tiny import tiny_llama

    root = tmp_path_factory.mktemp("parts")
    export_kv_model(
        tiny_llama(layers=LAYERS), root / "kv", chunk=8, context=40, check_ids=np.arange(21) * 7 % 384, seq_len=64
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, root / "kv" / name)
    quantize(root / "kv", root / "w8a8", preset="w8a8", calib="wikitext2-valid", windows=2)
    return root / "w8a8"


@pytest.fixture(scope="module")
def compiled_in_three(four_layer_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnxq.device.compile import compile_model

    out = tmp_path_factory.mktemp("htp") / "three"
    compile_model(four_layer_pair, out, parts=3)
    return out


def test_the_parts_hand_on_the_stream_codes_and_compute_the_whole(four_layer_pair: Path, tmp_path: Path) -> None:
    """ONNX Runtime CPU at its basic level (the QDQ semantics): every output of the parts in sequence equals
    the whole graph's, bit for bit."""
    from onnxq.core.steps import read_shape, step_inputs, write_parts

    graph = four_layer_pair / "prefill.qdq.onnx"
    proto = onnx.load(str(graph))
    plan = [Part(0, 2, 0), Part(2, 3, 0), Part(3, 4, 0)]
    files = []
    for i, part in enumerate(split_graph(proto, plan)):
        onnx.save(part, str(tmp_path / f"part{i}.onnx"))
        files.append(f"part{i}.onnx")
        handed = [i.name for i in part.graph.input if i.name.endswith(".q")]
        assert len(handed) == (i > 0)  # the residual stream's 16-bit codes
        assert all(
            i.type.tensor_type.elem_type == onnx.TensorProto.UINT16 for i in part.graph.input if i.name in handed
        )
    write_parts(tmp_path / f"prefill{PARTS_SUFFIX}", files, read_shape(graph))
    chunk, shape, mask_value = read_shape(graph)
    feeds = {**step_inputs(np.arange(chunk) * 7 % 384, 0, chunk, shape, mask_value), **shape.empty()}
    whole = cpu_session(graph, optimized=False)
    names = [o.name for o in whole.get_outputs()]
    parts = PartedSession(tmp_path / f"prefill{PARTS_SUFFIX}", lambda p: cpu_session(p, optimized=False))
    assert sorted(o.name for o in parts.get_outputs()) == sorted(names)
    for want, got in zip(whole.run(None, feeds), parts.run(names, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_compiled_in_three_parts_the_pair_gives_the_whole_pairs_logits_on_the_htp(
    four_layer_pair: Path, compiled_in_three: Path, eval_ids: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    for graph in ("prefill", "decode"):
        parts = read_parts(compiled_in_three / f"{graph}{PARTS_SUFFIX}")
        assert [p.name for p in parts] == [f"{graph}.part{i}_ctx.onnx" for i in range(3)]
        assert all(p.exists() and list(compiled_in_three.glob(f"{p.stem}*.bin")) for p in parts)
    assert not list(compiled_in_three.glob("*.qdq.onnx"))  # the parts' QDQ graphs are not shipped
    ids = eval_ids[0][:40]
    whole, split = Stepper(four_layer_pair, "qnn"), Stepper(compiled_in_three, "qnn")
    for stepper in (whole, split):
        stepper.reset()
    want = np.concatenate([whole.step(ids[:19]), *(whole.step([t]) for t in ids[19:])])
    got = np.concatenate([split.step(ids[:19]), *(split.step([t]) for t in ids[19:])])
    np.testing.assert_array_equal(got, want)  # the same integer computation, cut where codes are handed on
    from onnxq.cli import main

    assert main(["eval", str(compiled_in_three), str(four_layer_pair), "--ep", "qnn", "--windows", "2", "--json"]) == 0
    split_ppl, whole_ppl = (m["results"][0]["ppl"] for m in json.loads(capsys.readouterr().out)["models"])
    assert split_ppl == whole_ppl
    prompt = "The capital of France is"
    assert (
        generate(compiled_in_three, prompt, max_new_tokens=8, ep="qnn").tokens
        == generate(four_layer_pair, prompt, max_new_tokens=8, ep="qnn").tokens
    )


def test_a_scoring_graph_compiles_in_parts(four_layer_pair: Path, tmp_path: Path) -> None:
    """Also from a graph whose weights are all external data, as at real sizes: each part reads its
    own weights as it is written, and the binaries are those of the graph read whole."""
    from onnxq.device.compile import compile_model

    result = compile_model(four_layer_pair / "model.qdq.onnx", tmp_path / "htp", parts=2)
    assert read_parts(tmp_path / "htp" / f"model{PARTS_SUFFIX}") == [
        tmp_path / "htp" / f"model.part{i}_ctx.onnx" for i in range(2)
    ]
    assert result.rerun_max_abs_error == 0.0  # each part's reloaded context computes what compiled it
    external = tmp_path / "external" / "model.qdq.onnx"
    external.parent.mkdir()
    onnx.save(
        onnx.load(str(four_layer_pair / "model.qdq.onnx")),
        str(external),
        save_as_external_data=True,
        size_threshold=0,
        location="model.qdq.onnx.data",
    )
    compile_model(external, tmp_path / "htp-external", parts=2)
    ids = (np.arange(64) * 7 % 384).reshape(1, -1)
    logits = [
        open_graph(folder / f"model{PARTS_SUFFIX}", "qnn").run(None, {"input_ids": ids})[0]
        for folder in (tmp_path / "htp", tmp_path / "htp-external")
    ]
    np.testing.assert_array_equal(logits[1], logits[0])


def test_a_folder_compiled_in_parts_is_refused_where_it_cannot_run(
    compiled_in_three: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxq.cli import main

    with pytest.raises(OnnxqError, match="compiled for the HTP"):
        Stepper(compiled_in_three, "cpu")
    for command in (["validate"], ["package", "-o", str(tmp_path / "genai")], ["eval", "--windows", "1"]):
        assert main([command[0], str(compiled_in_three), *command[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("compiled" in err[0]), err


def test_parts_are_planned_by_weight_bytes(four_layer_pair: Path) -> None:
    per_layer, head, tail = layer_bytes(onnx.load(str(four_layer_pair / "decode.qdq.onnx")))
    assert len(per_layer) == LAYERS and len(set(per_layer)) == 1 and head > 0 and tail > 0
    for count in (1, 2, 3, 4):
        plan = plan_parts(per_layer, head, tail, 0, count)
        assert len(plan) == count and plan[0].first == 0 and plan[-1].last == LAYERS
        assert all(a.last == b.first for a, b in itertools.pairwise(plan))
    total = sum(per_layer) + head + tail
    limit = total // 2 + 1
    plan = plan_parts(per_layer, head, tail, limit)
    assert len(plan) >= 2 and all(p.weight_bytes <= limit for p in plan)
    assert sum(p.weight_bytes for p in plan) == total


def test_a_layer_over_the_limit_is_named(four_layer_pair: Path) -> None:
    with pytest.raises(OnnxqError, match=r"layer 2 holds 3 MB of weights, over the 2 MB limit.*--max-part-mb"):
        plan_parts([2**20, 2**20, 3 * 2**20, 2**20], 0, 0, 2 * 2**20)


def test_parts_that_cannot_be_made_are_one_line(
    four_layer_pair: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxq.cli import main

    assert main(["compile", str(four_layer_pair), "-o", str(tmp_path / "x"), "--parts", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parts 5: this model has 4 layers" in err[0]
    assert main(["compile", str(four_layer_pair), "-o", str(tmp_path / "y"), "--max-part-mb", "0"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

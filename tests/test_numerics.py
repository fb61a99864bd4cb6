"""Encodings, observers and the mirror's quantizer, on numbers worked out by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from calib.mirror import dequantize_linear, quantize_linear
from calib.observers import Observer
from onnxq.core.encodings import weight_encoding
from onnxq.core.errors import OnnxqError
from onnxq.core.qtypes import Encoding, QType, QuantSpec, from_range


def test_asymmetric_uint8_range_by_hand() -> None:
    enc = from_range(QuantSpec(QType.UINT8), -1.0, 3.0)
    assert enc.scale == pytest.approx(4.0 / 255)
    assert int(enc.zero_point) == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    assert enc.dequantize(enc.quantize(np.array([0.0]))) == pytest.approx([0.0])


def test_symmetric_int16_range_by_hand() -> None:
    enc = from_range(QuantSpec(QType.INT16, symmetric=True), -2.0, 0.5)
    assert enc.scale == pytest.approx(2.0 / 32767) and int(enc.zero_point) == 0


def test_nan_range_is_refused() -> None:
    with pytest.raises(OnnxqError, match="NaN"):
        from_range(QuantSpec(QType.UINT8), float("nan"), 1.0)


@pytest.mark.parametrize("qtype", [TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16])
def test_mirror_quantize_matches_onnxruntime_bit_for_bit(qtype: int) -> None:
    np_type = {
        TensorProto.UINT8: np.uint8,
        TensorProto.INT8: np.int8,
        TensorProto.UINT16: np.uint16,
        TensorProto.INT16: np.int16,
    }[qtype]
    scale = np.float32(0.05)
    zp = np_type(3)
    # ties (x/scale = k + 0.5) must round to even; values beyond the range must saturate
    x = np.concatenate(
        [
            np.arange(-40, 41) * 0.025,
            np.array([1e6, -1e6], dtype=np.float32),
            np.random.default_rng(0).normal(0, 3, 500),
        ]
    ).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [
            helper.make_tensor_value_info("q", qtype, [x.size]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size]),
        ],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("z", qtype, [], [int(zp)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    q_ref, y_ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    q = quantize_linear(torch.from_numpy(x), torch.tensor(scale), torch.tensor(int(zp)), qtype=qtype)
    y = dequantize_linear(q, torch.tensor(scale), torch.tensor(int(zp)))
    assert np.array_equal(q.numpy().astype(np.int64), q_ref.astype(np.int64))
    assert np.array_equal(y.numpy(), y_ref)


@pytest.mark.parametrize("qtype", [QType.UINT8, QType.INT8, QType.UINT16, QType.INT16])
def test_an_activation_quantizer_gives_the_same_values_and_gradients_on_every_path(qtype: QType) -> None:
    """Without a graph it computes in place; with a fixed range, through its own backward; with a
    learned range, through the STE graph. Same values and the same gradient in x, bit for bit."""
    from calib.fakequant import ActQuant

    spec = QuantSpec(qtype, symmetric=qtype.signed)
    quant = ActQuant(spec, from_range(spec, -2.0, 3.0))
    quant.requires_grad_(False)
    scale = float(quant.scale_zero()[0])
    ties = (np.arange(-80, 81) + 0.5) * scale  # x/scale on a tie: rounds to even in both
    x = np.concatenate([ties, [1e6, -1e6], np.random.default_rng(0).normal(0, 2, 500)]).astype(np.float32)
    grad = torch.from_numpy(np.random.default_rng(1).normal(0, 1, x.size).astype(np.float32))
    with torch.no_grad():
        fast = quant(torch.from_numpy(x))
    values, grads = [], []
    for learned in (False, True):
        quant.requires_grad_(learned)
        xt = torch.from_numpy(x).requires_grad_(True)
        y = quant(xt)
        y.backward(grad)
        values.append(y.detach().numpy())
        grads.append(xt.grad.numpy())
    assert np.array_equal(fast.numpy(), values[0]) and np.array_equal(values[0], values[1])
    assert np.array_equal(grads[0], grads[1])
    assert 0 < np.count_nonzero(grads[0] == 0) < x.size  # the clipped entries get none, the rest some


def test_observer_counts_non_finite_values_and_leaves_them_out() -> None:
    obs = Observer()
    obs.update(torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.5]))
    obs.update(torch.tensor([float("-inf")]))
    assert (obs.lo, obs.hi, obs.count, obs.nonfinite) == (-2.0, 1.0, 3, 3)
    assert obs.sum == -0.5 and obs.sumsq == 5.25  # exact in float64


def test_observer_histogram_extends_exactly() -> None:
    obs = Observer(bins=64)
    obs.update(torch.linspace(0.0, 1.0, 1000))
    obs.update(torch.tensor([-3.0, 5.0]))
    assert obs.lo == -3.0 and obs.hi == 5.0
    assert obs.hist is not None and float(obs.hist.sum()) == 1002
    assert obs.start <= -3.0 and obs.start + obs.width * obs.bins >= 5.0


def test_observer_memory_does_not_grow_with_windows() -> None:
    obs = Observer()
    for i in range(20):
        obs.update(torch.randn(10_000) * (1 + i))
    assert obs.hist is not None and obs.hist.numel() == obs.bins and obs.count == 200_000


def test_mse_range_beats_minmax_on_a_long_tail() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,)).float()
    obs = Observer()
    obs.update(x)
    mm = obs.stats("minmax", 15)
    mse = obs.stats("mse", 15)  # 4 bits: clipping the tail pays for a finer step
    assert mse.hi < mm.hi and mse.clipped > 0

    def error(lo: float, hi: float) -> float:
        enc = from_range(QuantSpec(QType.UINT4), lo, hi)
        return float(((enc.fake(x.numpy()) - x.numpy()) ** 2).mean())

    assert error(mse.lo, mse.hi) < 0.5 * error(mm.lo, mm.hi)


def test_weight_mse_clipping_never_increases_the_error() -> None:
    w = np.random.default_rng(1).standard_t(3, size=(256, 32)).astype(np.float32)
    spec = QuantSpec(QType.INT4, symmetric=True, axis=1)
    plain = weight_encoding(w, spec, "minmax")
    searched = weight_encoding(w, spec, "mse")
    err = lambda e: ((e.fake(w) - w) ** 2).sum(axis=0)  # noqa: E731
    assert np.all(err(searched) <= err(plain) + 1e-6)
    assert err(searched).sum() < 0.9 * err(plain).sum()


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_mse_search_in_channel_chunks_gives_the_same_scales(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clipping search goes through a large weight a few channels at a time (an lm_head's
    temporaries would be several copies of it): every scale is the one the whole search gives."""
    from onnxq.core import encodings

    w = np.random.default_rng(2).standard_t(3, size=(96, 70)).astype(np.float32)
    spec = QuantSpec(QType.for_bits(bits, signed=True), symmetric=True, axis=1)
    whole = weight_encoding(w, spec, "mse")
    monkeypatch.setattr(encodings, "CHUNK_BYTES", 8 * 96 * 3)  # 3 channels per chunk
    chunked = weight_encoding(w, spec, "mse")
    assert np.array_equal(np.asarray(whole.scale), np.asarray(chunked.scale))
    assert np.asarray(whole.scale).dtype == np.asarray(chunked.scale).dtype


@pytest.mark.parametrize(("bits", "block"), [(8, 0), (4, 0), (4, 16)])
def test_a_frozen_weight_quantizer_gives_its_forward_values_bit_for_bit(bits: int, block: int) -> None:
    """The sensitivity pass fake-quantizes each weight as it is read, in place (``frozen``): the
    values are the learnable quantizer's forward ones (its straight-through round is exact)."""
    from calib.fakequant import WeightQuant

    torch.manual_seed(0)
    w = torch.randn(256, 96) * torch.rand(96) * 3
    spec = QuantSpec(QType.for_bits(bits, signed=True), symmetric=True, axis=0 if block else 1, block_size=block)
    wq = WeightQuant(spec, w, weight_encoding(w.numpy(), spec))
    with torch.no_grad():
        wq.t.add_(0.1 * torch.randn_like(wq.t))  # a learned clipping, not the initial one
        want = wq(w)
    got = wq.frozen(w)
    assert torch.equal(got, want)
    assert len(torch.unique(got[:, 0])) > 2**bits // 4  # on a grid of many levels, not collapsed
    # a MatMul reads it a block of columns at a time, each quantized alone; a Gather takes rows
    blocks = [wq.frozen(w, part) for part in (slice(0, 40), slice(40, 80), slice(80, 96))]
    assert torch.equal(torch.cat(blocks, dim=1), want)
    rows = torch.tensor([5, 0, 255, 5])
    assert torch.equal(wq.frozen(w, rows), want[rows])


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_a_fixed_constant_read_in_parts_gives_the_whole_ones_values(axis: int | None) -> None:
    """An embedding table (or other constant with a fixed encoding) read a part at a time, as a Gather
    takes rows and a MatMul columns, gets the same values as the whole table."""
    from calib.fakequant import fixed

    torch.manual_seed(0)
    table = torch.randn(50, 12) * torch.rand(12)
    spec = QuantSpec(QType.UINT16) if axis is None else QuantSpec(QType.INT8, symmetric=True, axis=axis)
    enc = from_range(spec, -1.5, 2.0) if axis is None else weight_encoding(table.numpy(), spec)
    whole = fixed(enc, table)
    assert len(torch.unique(whole)) > 100
    rows = torch.tensor([3, 49, 0, 3])
    assert torch.equal(fixed(enc, table, rows), whole[rows])
    assert torch.equal(fixed(enc, table, slice(4, 9)), whole[:, 4:9])


def test_gptq_beats_rounding_on_the_layer_output() -> None:
    from calib.gptq import HessianObserver, gptq

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64))
    x = (rng.normal(size=(2048, 64)) @ mix).astype(np.float32)  # correlated inputs, as in LLMs
    w = rng.normal(0, 0.1, size=(64, 32)).astype(np.float32)
    spec = QuantSpec(QType.INT4, symmetric=True, axis=1)
    enc = weight_encoding(w, spec, "mse")
    obs = HessianObserver()
    obs.update(torch.from_numpy(x))
    w_gptq = gptq(w, enc, obs.hessian())
    assert np.array_equal(enc.fake(w_gptq), w_gptq)  # on the grid: emission gives the same integers
    err = lambda wq: float(((x @ wq - x @ w) ** 2).mean())  # noqa: E731
    assert err(w_gptq) < 0.7 * err(enc.fake(w))  # measured ~0.4x


def _gptq_layer() -> tuple[np.ndarray, np.ndarray, Encoding, Any]:
    """Correlated inputs, a random 4-bit weight, its MSE encoding and the inputs' Hessian observer."""
    from calib.gptq import HessianObserver

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2048, 64)) @ rng.normal(size=(64, 64))).astype(np.float32)
    w = rng.normal(0, 0.1, size=(64, 32)).astype(np.float32)
    enc = weight_encoding(w, QuantSpec(QType.INT4, symmetric=True, axis=1), "mse")
    obs = HessianObserver()
    obs.update(torch.from_numpy(x))
    return x, w, enc, obs


def test_gptq_refinement_sweeps_lower_the_layer_error_and_stay_on_the_grid() -> None:
    from calib.gptq import gptq

    x, w, enc, obs = _gptq_layer()
    err = lambda wq: float(((x @ wq - x @ w) ** 2).mean())  # noqa: E731
    errors = [err(gptq(w, enc, obs.hessian(), sweeps=n)) for n in (0, 1, 3)]
    refined = gptq(w, enc, obs.hessian(), sweeps=3)
    assert np.array_equal(enc.fake(refined), refined)  # still the encoding's integers
    assert errors[2] <= errors[1] <= errors[0]  # coordinate descent never goes up
    assert errors[2] < 0.95 * errors[0], errors  # measured 0.89x


@pytest.mark.parametrize("sweeps", [0, 2])
def test_gptq_records_where_each_target_lay_from_its_code(sweeps: int) -> None:
    """The rounding targets' places (what end-to-end rounding starts from) leave the rounding unchanged,
    and each lies within half a step of its code unless the code was clipped."""
    from calib.gptq import gptq

    _, w, enc, obs = _gptq_layer()
    place = np.full(w.shape, np.nan, np.float32)
    rounded = gptq(w, enc, obs.hessian(), sweeps=sweeps, place=place)
    assert np.array_equal(rounded, gptq(w, enc, obs.hessian(), sweeps=sweeps))
    codes = enc.quantize(rounded)
    inside = (codes > enc.spec.qmin) & (codes < enc.spec.qmax)
    assert np.isfinite(place).all() and np.abs(place[inside]).max() <= 0.5 + 1e-6
    assert np.abs(place).mean() > 0.1  # spread over the step, not all zero: measured 0.26 (0 sweeps), 0.17 (2)


def test_gptq_inverse_factor_in_place_is_the_out_of_place_one() -> None:
    """The upper Cholesky factor of H⁻¹ is made in H's own storage (H is the largest object at an 8k
    intermediate width), over several tiles: the same bits on every run, and the factor the chain of
    out-of-place calls gives. Equal to that chain only to rounding, as MKL may sum in another order for
    the other layout: bit for bit on one x86-64 CPU, at most 4.4e-16 of the largest entry on an AVX-512
    AMD EPYC (5 seeds); the bound is 20x that."""
    from calib.gptq import _inverse_factor_

    x = torch.randn(3000, 1100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = x.T @ x
    again = h.clone()
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    storage = h.data_ptr()
    assert _inverse_factor_(h) and _inverse_factor_(again)
    assert h.data_ptr() == storage and h.is_contiguous()
    assert torch.equal(h, again)
    assert (h - expected).abs().max() <= 1e-14 * expected.abs().max()
    assert not _inverse_factor_(-torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("block", [None, 16])
def test_gptq_in_column_slices_gives_the_whole_weights_integers(
    block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wide weight (a 128k-vocabulary lm_head) is rounded a slice of output columns at a time; each
    column is rounded on its own, so the integers are those of the whole weight at once, sweeps included."""
    from calib import gptq as gptq_module
    from calib.gptq import HessianObserver, gptq

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(1024, 64)) @ rng.normal(size=(64, 64))).astype(np.float32)
    x[:, 5] = 0.0  # a dead input row
    w = rng.normal(0, 0.1, size=(64, 200)).astype(np.float32)
    spec = QuantSpec(QType.INT4, symmetric=True, axis=0 if block else 1, block_size=block)
    enc = weight_encoding(w, spec, "mse")
    obs = HessianObserver()
    obs.update(torch.from_numpy(x))
    whole = gptq(w, enc, obs.hessian(), sweeps=2)
    monkeypatch.setattr(gptq_module, "COLUMN_BYTES", 8 * 64 * 48)  # slices of 48 columns: 48, ..., 8
    sliced = gptq(w, enc, obs.hessian(), sweeps=2)
    assert np.array_equal(enc.quantize(sliced), enc.quantize(whole))

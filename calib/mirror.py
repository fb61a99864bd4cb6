"""The torch mirror: an ONNX interpreter in torch, so the graph itself is what we calibrate and train.

There is no second model definition to keep in sync: an op table maps ONNX op types to functions
that use the spec's parameter names, and :class:`Mirror` walks the nodes in order, keeping values
by name and freeing each one after its last use. *Taps* see every value as it is produced; a tap
may return a replacement, which is how observers (calibration) and fake quantizers (learning) hook
in without touching the graph.

QuantizeLinear/DequantizeLinear follow ONNX Runtime exactly (division by the scale, round half to
even, saturation), so a QDQ model run here gives ORT's numbers (tests hold it to that).

Debugging: ``ONNXQ_MIRROR_DEBUG=1`` logs every node with its output ranges;
``Mirror.run(..., stop_at=N)`` returns all live values after node N.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from onnxq.core.memory import slices

log = logging.getLogger(__name__)

Tap = Callable[[str, torch.Tensor], "torch.Tensor | None"]
OpFn = Callable[..., Any]
OPS: dict[str, OpFn] = {}
#: what a step reads of a constant computed on read: all of it (None), a block of its last axis (a
#: MatMul's columns: a slice) or entries of its first axis (a Gather's rows: a tensor of indices)
Part = slice | torch.Tensor | None
Read = Callable[[Part], torch.Tensor]
#: a constant computed on read of up to this many bytes goes into a MatMul whole; a larger one (a 128k
#: lm_head) :data:`READ_CHUNK` bytes of columns at a time, each block's reading temporaries being its size
READ_BYTES = 2**27
READ_CHUNK = 2**25

#: ONNX TensorProto data type codes -> torch dtypes (int4/uint16 values travel as wider ints)
_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    4: torch.int32,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.int64,
    13: torch.int64,
    16: torch.bfloat16,
    21: torch.int32,
    22: torch.int8,
}
#: integer ranges of the quantized types, by ONNX data type code
QRANGE: dict[int, tuple[int, int]] = {
    2: (0, 255),
    3: (-128, 127),
    4: (0, 65535),
    5: (-32768, 32767),
    21: (0, 15),
    22: (-8, 7),
}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    """Register a function for one or more op types."""

    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def to_torch(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch, widening the types torch lacks (int4, uint16/32)."""
    kind = str(array.dtype)
    if kind in ("int4", "int2"):
        array = array.astype(np.int8)
    elif kind in ("uint4", "uint2"):
        array = array.astype(np.uint8)
    elif array.dtype in (np.uint16, np.uint32):
        array = array.astype(np.int64)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


# --------------------------------------------------------------------------- elementwise
def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def run(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return fn(A, B)

    return run


OPS["Add"] = _binary(torch.add)
OPS["Sub"] = _binary(torch.sub)
OPS["Mul"] = _binary(torch.mul)
OPS["Equal"] = _binary(torch.eq)
OPS["Less"] = _binary(torch.lt)
OPS["LessOrEqual"] = _binary(torch.le)
OPS["Greater"] = _binary(torch.gt)
OPS["GreaterOrEqual"] = _binary(torch.ge)
OPS["And"] = _binary(torch.logical_and)
OPS["Or"] = _binary(torch.logical_or)
OPS["MatMul"] = _binary(torch.matmul)


@op("Div")
def _div(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    if not A.is_floating_point() and not B.is_floating_point():
        return torch.div(A, B, rounding_mode="trunc")
    return A / B


@op("Pow")
def _pow(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    if Y.numel() == 1 and float(Y) == 2.0:
        return X * X
    return torch.pow(X, Y)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    def run(X: torch.Tensor) -> torch.Tensor:
        return fn(X)

    return run


for _name, _fn in {
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Relu": torch.relu,
    "Erf": torch.erf,
    "Cos": torch.cos,
    "Sin": torch.sin,
    "Not": torch.logical_not,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "IsNaN": torch.isnan,
}.items():
    OPS[_name] = _unary(_fn)


@op("Identity")
def _identity(input: torch.Tensor) -> torch.Tensor:
    return input


@op("Max")
def _max(*data: torch.Tensor) -> torch.Tensor:
    out = data[0]
    for d in data[1:]:
        out = torch.maximum(out, d)
    return out


@op("Min")
def _min(*data: torch.Tensor) -> torch.Tensor:
    out = data[0]
    for d in data[1:]:
        out = torch.minimum(out, d)
    return out


@op("Where")
def _where(condition: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.where(condition.bool(), X, Y)


@op("Cast")
def _cast(input: torch.Tensor, *, to: int, saturate: int = 1) -> torch.Tensor:  # noqa: ARG001
    return input.to(_DTYPES[to])


@op("Softmax")
def _softmax(input: torch.Tensor, *, axis: int = -1) -> torch.Tensor:
    return torch.softmax(input, dim=axis)


@op("LogSoftmax")
def _log_softmax(input: torch.Tensor, *, axis: int = -1) -> torch.Tensor:
    return torch.log_softmax(input, dim=axis)


@op("Gemm")
def _gemm(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    transA: int = 0,
    transB: int = 0,
) -> torch.Tensor:
    a = A.T if transA else A
    b = B.T if transB else B
    y = alpha * (a @ b)
    return y if C is None else y + beta * C


# --------------------------------------------------------------------------- reductions / norms
def _axes(axes: torch.Tensor | Iterable[int] | None) -> list[int] | None:
    if axes is None:
        return None
    if isinstance(axes, torch.Tensor):
        return [int(a) for a in axes.flatten().tolist()]
    return [int(a) for a in axes]


def _reduce(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(
        data: torch.Tensor,
        axes: torch.Tensor | None = None,
        *,
        keepdims: int = 1,
        noop_with_empty_axes: int = 0,
        **attrs: Any,
    ) -> torch.Tensor:
        dims = _axes(axes if axes is not None else attrs.get("axes"))
        if not dims:
            if noop_with_empty_axes:
                return data
            dims = list(range(data.dim()))
        return fn(data, dim=dims, keepdim=bool(keepdims))

    return run


OPS["ReduceMean"] = _reduce(torch.mean)
OPS["ReduceSum"] = _reduce(torch.sum)
OPS["ReduceMax"] = _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim))
OPS["ReduceMin"] = _reduce(lambda x, dim, keepdim: torch.amin(x, dim=dim, keepdim=keepdim))


@op("RMSNormalization")
def _rms_norm(
    X: torch.Tensor, scale: torch.Tensor, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1
) -> torch.Tensor:
    del stash_type
    dims = list(range(axis % X.dim(), X.dim()))
    # ORT's order of operations: x / sqrt(mean(x²) + eps) * scale
    return X / torch.sqrt((X * X).mean(dim=dims, keepdim=True) + epsilon) * scale


@op("SimplifiedLayerNormalization")
def _simplified_ln(
    X: torch.Tensor, scale: torch.Tensor, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1
) -> torch.Tensor:
    return _rms_norm(X, scale, axis=axis, epsilon=epsilon, stash_type=stash_type)


@op("LayerNormalization")
def _layer_norm(
    X: torch.Tensor,
    Scale: torch.Tensor,
    B: torch.Tensor | None = None,
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
    stash_type: int = 1,
) -> torch.Tensor:
    del stash_type
    shape = X.shape[axis % X.dim() :]
    return torch.nn.functional.layer_norm(X, shape, Scale, B, epsilon)


@op("LpNormalization")
def _lp_norm(input: torch.Tensor, *, axis: int = -1, p: int = 2) -> torch.Tensor:
    return input / torch.linalg.vector_norm(input, ord=p, dim=axis, keepdim=True)


# --------------------------------------------------------------------------- data movement
@op("Reshape")
def _reshape(data: torch.Tensor, shape: torch.Tensor, *, allowzero: int = 0) -> torch.Tensor:
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


@op("Transpose")
def _transpose(data: torch.Tensor, *, perm: list[int] | None = None) -> torch.Tensor:
    if perm is None:
        perm = list(reversed(range(data.dim())))
    return data.permute(*perm)


@op("Concat")
def _concat(*inputs: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.cat(inputs, dim=axis)


@op("Split")
def _split(
    input: torch.Tensor,
    split: torch.Tensor | None = None,
    *,
    axis: int = 0,
    num_outputs: int | None = None,
) -> tuple[torch.Tensor, ...]:
    if split is not None:
        return torch.split(input, [int(s) for s in split.tolist()], dim=axis)
    assert num_outputs is not None
    size = math.ceil(input.shape[axis] / num_outputs)
    return torch.split(input, size, dim=axis)


@op("Slice")
def _slice(
    data: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    axes: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    starts_l, ends_l = starts.tolist(), ends.tolist()
    axes_l = axes.tolist() if axes is not None else list(range(len(starts_l)))
    steps_l = steps.tolist() if steps is not None else [1] * len(starts_l)
    index: list[Any] = [slice(None)] * data.dim()
    flips = []
    for start0, end0, axis0, step in zip(starts_l, ends_l, axes_l, steps_l, strict=True):
        axis = int(axis0) % data.dim()
        size = data.shape[axis]
        first = start0 + size if start0 < 0 else start0
        last = end0 + size if end0 < 0 else end0
        if step > 0:
            index[axis] = slice(max(0, min(size, first)), max(0, min(size, last)), step)
        else:
            lo, hi = max(-1, min(size - 1, first)), max(-1, min(size - 1, last))
            index[axis] = torch.arange(lo, hi, step, device=data.device)
            flips.append(axis)
    if flips:  # rare: negative steps, done one axis at a time with index_select
        out = data
        for axis, sel in enumerate(index):
            if isinstance(sel, torch.Tensor):
                out = out.index_select(axis, sel)
            elif sel != slice(None):
                out = out[(slice(None),) * axis + (sel,)]
        return out
    return data[tuple(index)]


@op("Unsqueeze")
def _unsqueeze(data: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    dims = sorted(int(a) % (data.dim() + len(axes.flatten())) for a in axes.flatten().tolist())
    out = data
    for d in dims:
        out = out.unsqueeze(d)
    return out


@op("Squeeze")
def _squeeze(data: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    if axes is None:
        return data.squeeze()
    dims = sorted((int(a) % data.dim() for a in axes.flatten().tolist()), reverse=True)
    out = data
    for d in dims:
        out = out.squeeze(d)
    return out


@op("Flatten")
def _flatten(input: torch.Tensor, *, axis: int = 1) -> torch.Tensor:
    axis %= max(input.dim(), 1)
    return input.reshape(math.prod(input.shape[:axis]), -1)


@op("Expand")
def _expand(input: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    target = torch.broadcast_shapes(tuple(input.shape), tuple(int(s) for s in shape.tolist()))
    return input.expand(target)


def _positive(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Gather's indices, negative ones counted from the end of an axis of ``size``."""
    idx = indices.long()
    return torch.where(idx < 0, idx + size, idx)


@op("Gather")
def _gather(data: torch.Tensor, indices: torch.Tensor, *, axis: int = 0) -> torch.Tensor:
    axis %= data.dim()
    idx = _positive(indices, data.shape[axis])
    flat = data.index_select(axis, idx.reshape(-1))
    return flat.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


@op("Shape")
def _shape(data: torch.Tensor, *, start: int = 0, end: int | None = None) -> torch.Tensor:
    dims = list(data.shape)[start:end]
    return torch.tensor(dims, dtype=torch.int64)


@op("Size")
def _size(data: torch.Tensor) -> torch.Tensor:
    return torch.tensor(data.numel(), dtype=torch.int64)


@op("Range")
def _range(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("ConstantOfShape")
def _constant_of_shape(input: torch.Tensor, *, value: np.ndarray | None = None) -> torch.Tensor:
    fill = to_torch(np.asarray(value)).reshape(()) if value is not None else torch.tensor(0.0)
    return torch.full([int(s) for s in input.tolist()], fill.item(), dtype=fill.dtype)


@op("Trilu")
def _trilu(input: torch.Tensor, k: torch.Tensor | None = None, *, upper: int = 1) -> torch.Tensor:
    diag = int(k) if k is not None else 0
    return torch.triu(input, diag) if upper else torch.tril(input, diag)


@op("CumSum")
def _cumsum(x: torch.Tensor, axis: torch.Tensor, *, exclusive: int = 0, reverse: int = 0) -> torch.Tensor:
    dim = int(axis)
    y = x.flip(dim) if reverse else x
    out = torch.cumsum(y, dim)
    if exclusive:
        out = out - y
    return out.flip(dim) if reverse else out


# --------------------------------------------------------------------------- quantization
def _per_axis(param: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    """Broadcast a per-tensor, per-axis or per-block parameter against ``x``."""
    if param.dim() == 0 or (param.numel() == 1 and block_size == 0):
        return param.reshape(())
    axis %= x.dim()
    if block_size:
        return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


@op("QuantizeLinear")
def quantize_linear(
    x: torch.Tensor,
    y_scale: torch.Tensor,
    y_zero_point: torch.Tensor | None = None,
    *,
    axis: int = 1,
    block_size: int = 0,
    saturate: int = 1,
    output_dtype: int = 0,
    precision: int = 0,
    qtype: int = 2,
) -> torch.Tensor:
    """Integer values (carried as float) exactly as ONNX Runtime computes them."""
    del saturate, precision
    code = output_dtype or qtype
    lo, hi = QRANGE[code]
    scale = _per_axis(y_scale.to(x.dtype), x, axis, block_size)
    zp = 0.0 if y_zero_point is None else _per_axis(y_zero_point.to(x.dtype), x, axis, block_size)
    return torch.clamp(torch.round(x / scale) + zp, lo, hi)


@op("DequantizeLinear")
def dequantize_linear(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor | None = None,
    *,
    axis: int = 1,
    block_size: int = 0,
    output_dtype: int = 0,
) -> torch.Tensor:
    del output_dtype
    scale = _per_axis(x_scale.float(), x, axis, block_size)
    xf = x.to(torch.float32)
    if x_zero_point is None:
        return xf * scale
    zp = _per_axis(x_zero_point.to(torch.float32), x, axis, block_size)
    return (xf - zp) * scale


# --------------------------------------------------------------------------- the interpreter
@dataclass(frozen=True)
class Step:
    """One node, resolved for execution."""

    name: str
    op_type: str
    fn: OpFn
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]


def _attr_value(attr: ir.Attr) -> Any:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, (tuple, list)):
        return list(value)
    return value


class _ReadMatMul(torch.autograd.Function):
    """``a @ B`` for a ``B`` computed on read, a block of columns at a time: the backward pass reads B again
    instead of keeping it (no gradient goes to B, and none to anything that made it)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, read: Read, parts: list[Part]) -> torch.Tensor:  # type: ignore[override]
        ctx.read, ctx.parts = read, parts
        if len(parts) == 1:
            return a @ read(parts[0])
        return torch.cat([a @ read(part) for part in parts], dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        total: torch.Tensor | None = None
        for part in ctx.parts:
            term = (grad if part is None else grad[..., part]) @ ctx.read(part).mT
            total = term if total is None else total.add_(term)
        return total, None, None


class Mirror(torch.nn.Module):
    """An ONNX graph as a torch module.

    Args:
        model: the ONNX model (float or QDQ).
        params: initializer names to expose as trainable ``torch.nn.Parameter`` s (rotated weights,
            learned scales); every other constant is a plain tensor.
        dtype: float type of the constants (float64 proves rewrites exact beyond float32 noise).
    """

    def __init__(self, model: ir.Model, params: Iterable[str] = (), dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        graph = model.graph
        wanted = set(params)
        self.consts: dict[str, torch.Tensor] = {}
        self.trainable = torch.nn.ParameterDict()
        self._param_keys: dict[str, str] = {}
        for name, value in graph.initializers.items():
            if value.const_value is None:
                continue
            tensor = to_torch(value.const_value.numpy())
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if name in wanted:
                key = f"p{len(self._param_keys)}"
                self._param_keys[name] = key
                self.trainable[key] = torch.nn.Parameter(tensor.clone())
            else:
                self.consts[name] = tensor
        self.input_names = [v.name for v in graph.inputs if v.name not in self.consts]
        self.output_names = [v.name for v in graph.outputs]
        steps = []
        for node in graph:
            if node.op_type == "Constant":
                attr = next(iter(node.attributes.values()))
                const = to_torch(np.asarray(_attr_value(attr)))
                self.consts[node.outputs[0].name] = const.to(dtype) if const.is_floating_point() else const
                continue
            fn = OPS.get(node.op_type)
            if fn is None:
                raise NotImplementedError(f"mirror has no op {node.domain or 'ai.onnx'}::{node.op_type}")
            attrs = {k: _attr_value(a) for k, a in node.attributes.items()}
            if node.op_type == "QuantizeLinear" and len(node.inputs) > 2 and node.inputs[2] is not None:
                zp = node.inputs[2]
                attrs["qtype"] = int(zp.dtype) if zp.dtype is not None else 2
            steps.append(
                Step(
                    node.name or f"{node.op_type}_{len(steps)}",
                    node.op_type,
                    fn,
                    tuple(v.name if v is not None else None for v in node.inputs),
                    tuple(v.name for v in node.outputs),
                    attrs,
                )
            )
        self.steps = steps
        last_use: dict[str, int] = {}
        for i, step in enumerate(steps):
            for name in step.inputs:
                if name is not None:
                    last_use[name] = i
        for name in self.output_names:
            last_use[name] = len(steps)
        self.last_use = last_use
        self.debug = os.environ.get("ONNXQ_MIRROR_DEBUG") == "1"
        #: constants computed, without gradients, each time a step reads them instead of held (frozen
        #: fake-quantized weights): a MatMul reads them a block of columns at a time, a Gather the rows it takes
        self.on_read: dict[str, Read] = {}

    def const(self, name: str) -> torch.Tensor:
        """The current value of a constant (trainable or not)."""
        computed = self.on_read.get(name)
        if computed is not None:
            return computed(None)
        key = self._param_keys.get(name)
        return self.trainable[key] if key is not None else self.consts[name]

    def set_const(self, name: str, value: torch.Tensor) -> None:
        """Replace a non-trainable constant (used to plug in rotated weights)."""
        self.consts[name] = value

    def param(self, name: str) -> torch.nn.Parameter:
        """The trainable parameter that stands for initializer ``name``."""
        return self.trainable[self._param_keys[name]]

    def window(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The feeds of one window of token ids, for a graph whose one input is the ids."""
        return {self.input_names[0]: torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)}

    def run(
        self,
        feeds: Mapping[str, torch.Tensor | np.ndarray],
        *,
        tap: Tap | None = None,
        keep: Iterable[str] = (),
        stop_at: int | None = None,
        start: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Execute the graph; returns graph outputs plus the values named in ``keep``.

        Args:
            feeds: graph inputs by name.
            tap: called as ``tap(name, value)`` for every value produced; a returned tensor
                replaces the value for all consumers.
            keep: names of intermediate values to return.
            stop_at: index of the last node to run; all live values are returned.
            start: values to seed (with ``feeds``) when running only part of the graph.
        """
        env: dict[str, torch.Tensor] = {}
        for name, value in feeds.items():
            env[name] = value if isinstance(value, torch.Tensor) else to_torch(np.asarray(value))
            replaced = tap(name, env[name]) if tap is not None else None  # float inputs are tapped too
            if replaced is not None:
                env[name] = replaced
        if start:
            env.update(start)
        keep_set = set(keep)
        for i, step in enumerate(self.steps):
            if all(o in env for o in step.outputs):
                continue  # seeded by `start`
            self._execute(step, env, tap)
            if self.debug:
                for name in step.outputs:
                    if name in env:
                        self._log(i, step, env[name])
            if stop_at is not None and i >= stop_at:
                return env
            for name in step.inputs:
                done = name is not None and self.last_use.get(name) == i
                if done and name not in keep_set and name in env and name not in feeds:
                    del env[name]
        return {k: v for k, v in env.items() if k in keep_set or k in self.output_names}

    def run_steps(
        self,
        first: int,
        last: int,
        env: Mapping[str, torch.Tensor],
        *,
        tap: Tap | None = None,
        want: str,
    ) -> torch.Tensor:
        """Run nodes ``first..last`` (inclusive) on ``env`` and return value ``want``.

        Used to run one decoder layer on cached inputs; nothing is freed, the range is small.
        """
        values = dict(env)
        for step in self.steps[first : last + 1]:
            self._execute(step, values, tap)
        return values[want]

    def _execute(self, step: Step, values: dict[str, torch.Tensor], tap: Tap | None) -> None:
        """Run one node on ``values`` (constants looked up) and store its outputs there, tapped."""
        result = self._read_in_parts(step, values)
        if result is None:
            args = [None if n is None else values[n] if n in values else self.const(n) for n in step.inputs]
            while args and args[-1] is None:
                args.pop()
            result = step.fn(*args, **step.attrs)
        outs = result if isinstance(result, (tuple, list)) else (result,)
        for name, produced in zip(step.outputs, outs, strict=False):
            replaced = tap(name, produced) if tap is not None else None
            values[name] = produced if replaced is None else replaced

    def _read_in_parts(self, step: Step, values: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A MatMul by, or a Gather from, a constant computed on read, reading only a part of it at a time
        (a 128k-vocabulary lm_head or embedding is a gigabyte); None for any other step."""
        if step.op_type == "MatMul" and step.inputs[1] in self.on_read and step.inputs[0] in values:
            shape = self.consts[step.inputs[1]].shape
            column = 4 * math.prod(shape[:-1])
            parts: list[Part] = [None] if column * shape[-1] <= READ_BYTES else [*slices(shape[-1], column, READ_CHUNK)]
            return _ReadMatMul.apply(values[step.inputs[0]], self.on_read[step.inputs[1]], parts)
        gather = step.op_type == "Gather" and step.attrs.get("axis", 0) == 0
        if gather and step.inputs[0] in self.on_read and step.inputs[1] in values:
            idx = _positive(values[step.inputs[1]], self.consts[step.inputs[0]].shape[0])
            rows = self.on_read[step.inputs[0]](idx.reshape(-1))
            return rows.reshape((*idx.shape, *rows.shape[1:]))
        return None

    def step_index(self) -> dict[str, int]:
        """Node output name -> index of the step that produces it."""
        return {name: i for i, step in enumerate(self.steps) for name in step.outputs}

    def external_inputs(self, first: int, last: int) -> set[str]:
        """Values read by nodes ``first..last`` that are neither produced there nor constants."""
        produced: set[str] = set()
        needed: set[str] = set()
        for step in self.steps[first : last + 1]:
            needed |= {
                n
                for n in step.inputs
                if n is not None and n not in produced and n not in self.consts and n not in self._param_keys
            }
            produced |= set(step.outputs)
        return needed

    def run_range(self, first: int, last: int, values: dict[str, torch.Tensor], tap: Tap | None = None) -> None:
        """Run steps ``first`` to ``last - 1`` on ``values`` in place (nothing freed)."""
        for step in self.steps[first:last]:
            self._execute(step, values, tap)

    def checkpoint(
        self, ids: torch.Tensor, cuts: list[tuple[int, tuple[str, ...]]], tap: Tap | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """A forward pass without a graph that keeps only what crosses into each segment of ``cuts``
        (from :meth:`segments`), for :meth:`backward_range` to recompute them from; the last segment
        is not run."""
        feed = self.input_names[0]
        saved: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            fed = tap(feed, ids) if tap is not None else None
            env: dict[str, torch.Tensor] = {feed: ids if fed is None else fed}
            for i, ((first, last), (_, crossing)) in enumerate(zip(self.spans(cuts), cuts, strict=True)):
                saved.append({k: env[k] for k in crossing if k in env})
                if i == len(cuts) - 1:
                    break
                self.run_range(first, last, env, tap)
                keep = set(cuts[i + 1][1])  # the next segment's inputs
                env = {k: v for k, v in env.items() if k in keep}
        return saved

    def spans(self, cuts: list[tuple[int, tuple[str, ...]]]) -> list[tuple[int, int]]:
        """Each segment of ``cuts`` as its first step and one past its last."""
        firsts = [first for first, _ in cuts]
        return list(zip(firsts, [*firsts[1:], len(self.steps)], strict=True))

    def backward_range(
        self,
        first: int,
        last: int,
        start: dict[str, torch.Tensor],
        upstream: dict[str, torch.Tensor],
        tap: Tap | None = None,
        loss: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Recompute steps ``first`` to ``last - 1`` from ``start`` with gradients, and back-propagate
        the gradients ``upstream`` holds for the values they produce (popped from it), plus ``loss`` of
        the values where given. Returns the gradient of each value in ``start`` that got one."""
        leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in start.items()}
        values = dict(leaves)
        self.run_range(first, last, values, tap)
        produced = {name for step in self.steps[first:last] for name in step.outputs}
        seeds = [(values[k], upstream.pop(k)) for k in list(upstream) if k in produced]
        seeds = [(v, g) for v, g in seeds if v.requires_grad]
        if loss is not None:
            seeds.append((loss(values), torch.ones(())))
        if seeds:
            torch.autograd.backward([v for v, _ in seeds], [g for _, g in seeds])
        return {k: leaf.grad for k, leaf in leaves.items() if leaf.grad is not None}

    def segments(self, count: int) -> list[tuple[int, tuple[str, ...]]]:
        """About ``count`` cut points for checkpointed backward passes: (first step of a segment,
        the values that cross into it), cut where the fewest values are live (between decoder
        layers that is the residual stream alone), so a segment's activations can be recomputed
        from a few tensors instead of all of them being kept for the backward pass."""
        produced = dict.fromkeys(self.input_names, -1)
        for i, step in enumerate(self.steps):
            for name in step.outputs:
                produced[name] = i
        starts: dict[int, list[str]] = {}
        ends: dict[int, list[str]] = {}
        for name, first in produced.items():
            last = self.last_use.get(name, first)
            if last > first:
                starts.setdefault(first, []).append(name)
                ends.setdefault(last, []).append(name)
        live: set[str] = set(starts.get(-1, ()))
        crossing: list[set[str]] = []  # crossing[i]: live between step i-1 and step i
        for i in range(len(self.steps)):
            crossing.append(set(live))
            live -= set(ends.get(i, ()))
            live |= set(starts.get(i, ()))
        fewest = min((len(c - set(self.input_names)) for c in crossing[1:]), default=0)
        cuts = [i for i in range(1, len(self.steps)) if len(crossing[i] - set(self.input_names)) <= fewest]
        chosen = [0]
        spacing = max(1, len(self.steps) // max(count, 1))
        for i in cuts:
            if i - chosen[-1] >= spacing:
                chosen.append(i)
        return [(i, tuple(sorted(crossing[i]))) for i in chosen]

    def to_device(self, device: str | torch.device) -> Mirror:
        """Move constants and parameters (``Module.to`` does not see the plain constants dict)."""
        self.consts = {k: v.to(device) for k, v in self.consts.items()}
        return self.to(device)

    def forward(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(feeds)

    @staticmethod
    def _log(i: int, step: Step, value: torch.Tensor) -> None:
        if value.is_floating_point() and value.numel():
            log.info(
                "#%d %s %s -> %s %s [%.4g, %.4g]",
                i,
                step.op_type,
                step.name,
                step.outputs,
                tuple(value.shape),
                float(value.min()),
                float(value.max()),
            )
        else:
            log.info("#%d %s %s -> %s %s", i, step.op_type, step.name, step.outputs, tuple(value.shape))

"""The KV-cache step graphs' inputs and outputs (see :mod:`onnxq.stages.export_kv`): what every stage feeds them.

A step graph reads ``input_ids``, ``position_ids``, an additive ``attention_mask`` and per layer
``past_key_i``/``past_value_i``; its metadata names its chunk, cache slots and mask value.
:class:`StepRunner` is the host side: it feeds a pair chunk by chunk and keeps the cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core.errors import OnnxqError

DEFAULT_CHUNK = 64
DEFAULT_CONTEXT = 512
#: the scoring graph's window: a pair is calibrated and evaluated on windows this long, or its whole cache
WINDOW = 512
#: A step graph compiled in parts (:mod:`onnxq.device.parts`) is a manifest with this suffix.
PARTS_SUFFIX = ".parts.json"


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    slots: int  # P: past positions a step can see

    def empty(self) -> dict[str, np.ndarray]:
        shape = (1, self.kv_heads, self.slots, self.head_dim)
        out = {}
        for i in range(self.layers):
            out[f"past_key_{i}"] = np.zeros(shape, np.float32)
            out[f"past_value_{i}"] = np.zeros(shape, np.float32)
        return out


def step_mask(position: int, valid: int, chunk: int, slots: int, mask_value: float) -> np.ndarray:
    """The additive mask of a step writing tokens at ``position..position+valid-1`` into a chunk of N.

    Past slots ``0..position-1`` are visible; within the chunk, causal; padding sees itself only.
    """
    mask = np.full((1, 1, chunk, slots + chunk), mask_value, dtype=np.float32)
    mask[..., : min(position, slots)] = 0.0
    for j in range(chunk):
        mask[0, 0, j, slots : slots + min(j, max(valid - 1, 0)) + 1] = 0.0
        if j >= valid:  # padding rows: keep the softmax well defined, results are discarded
            mask[0, 0, j, slots + j] = 0.0
    return mask


def step_inputs(
    ids: np.ndarray, position: int, chunk: int, shape: CacheShape, mask_value: float, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """input_ids, position_ids and attention_mask for ``ids`` (≤ chunk tokens) written at ``position``."""
    n = len(ids)
    if n > chunk:
        raise ValueError(f"{n} tokens do not fit a chunk of {chunk}")
    tokens = np.full((1, chunk), pad_id, dtype=np.int64)
    tokens[0, :n] = ids
    positions = (position + np.arange(chunk, dtype=np.int64)).reshape(1, -1)
    return {
        "input_ids": tokens,
        "position_ids": positions,
        "attention_mask": step_mask(position, n, chunk, shape.slots, mask_value),
    }


def write_cache(cache: dict[str, np.ndarray], results: dict[str, np.ndarray], position: int, n: int) -> None:
    """Write a step's ``present_*`` entries of its ``n`` real tokens into the host's cache at ``position``."""
    for name, past in cache.items():
        past[:, :, position : position + n] = results[name.replace("past_", "present_", 1)][:, :, :n]


def read_shape(model_path: Path) -> tuple[int, CacheShape, float]:
    """(chunk, cache shape, mask value) of an exported step graph, from its inputs and metadata, or
    of a step graph compiled in parts, from its manifest."""
    from onnxq.core import ir as oir

    if model_path.name.endswith(PARTS_SUFFIX):
        step = json.loads(model_path.read_text(encoding="utf-8")).get("step")
        if not step:
            raise OnnxqError(f"{model_path} is not a KV-cache step graph", "export one with `onnxq export --kv-cache`")
        return int(step["chunk"]), CacheShape(**step["cache"]), float(step["mask_value"])
    return shape_of(oir.read_graph(model_path), model_path)


def write_parts(path: Path, files: list[str], step: tuple[int, CacheShape, float] | None) -> None:
    """The manifest of a graph compiled in parts: its part files in order, and its step shape."""
    shape = None if step is None else {"chunk": step[0], "cache": asdict(step[1]), "mask_value": step[2]}
    path.write_text(json.dumps({"parts": files, "step": shape}, indent=1) + "\n", encoding="utf-8")


def read_parts(path: Path) -> list[Path]:
    """The part files a manifest names, in order."""
    return [path.parent / name for name in json.loads(path.read_text(encoding="utf-8"))["parts"]]


def shape_of(proto: Any, model_path: Path) -> tuple[int, CacheShape, float]:
    """:func:`read_shape` of a loaded ModelProto."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if "onnxq.kv_slots" not in meta:
        raise OnnxqError(f"{model_path} is not a KV-cache step graph", "export one with `onnxq export --kv-cache`")
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    layers = sum(1 for n in dims if n.startswith("past_key_"))
    _, kv_heads, slots, head_dim = dims["past_key_0"]
    return int(meta["onnxq.kv_chunk"]), CacheShape(layers, kv_heads, head_dim, slots), float(meta["onnxq.mask_value"])


class StepRunner:
    """Two sessions and one cache: run chunks of tokens at increasing positions.

    ``make_session`` opens a graph on some execution provider; decode's is opened when first used.
    """

    def __init__(self, prefill: Path, decode: Path, make_session: Callable[[Path], Any]) -> None:
        self.chunk, self.shape, self.mask_value = read_shape(prefill)
        decode_chunk, decode_shape, _ = read_shape(decode)
        if decode_chunk != 1 or decode_shape != self.shape:
            raise OnnxqError(f"{prefill.parent}: {decode.name} does not match {prefill.name}", "export both in one run")
        self.prefill = make_session(prefill)
        self._decode_graph, self._make_session = decode, make_session
        self._decode: Any = None
        self.cache = self.shape.empty()
        self.position = 0

    @property
    def decode(self) -> Any:
        """The decode session, made when first used: scoring whole chunks never needs it, and on the HTP
        each session holds a context of the model's size."""
        if self._decode is None:
            self._decode = self._make_session(self._decode_graph)
        return self._decode

    def reset(self) -> None:
        self.cache = self.shape.empty()
        self.position = 0

    def step(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Run ``ids`` (chunked as needed) from the current position; returns their logits [n, vocab]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = []
        start = 0
        while start < len(ids):
            take = self.chunk if len(ids) - start > 1 else 1
            part = ids[start : start + take]
            out.append(self._run(part, self.prefill if take > 1 else self.decode, take))
            start += len(part)
        return np.concatenate(out, axis=0)

    def _run(self, part: np.ndarray, sess: Any, chunk: int) -> np.ndarray:
        n = len(part)
        if self.position + n > self.shape.slots:
            raise OnnxqError(f"the context is full ({self.shape.slots} positions)", "export with a larger --context")
        feeds = step_inputs(part, self.position, chunk, self.shape, self.mask_value)
        feeds.update(self.cache)
        names = [o.name for o in sess.get_outputs()]
        results = dict(zip(names, sess.run(None, feeds), strict=True))
        write_cache(self.cache, results, self.position, n)
        self.position += n
        return results["logits"][0, :n]

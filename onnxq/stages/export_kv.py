"""Static-shape graphs for generation: prefill (a chunk of N tokens) and decode (1 token), KV cache as I/O.

The HTP needs every shape fixed, so the cache is a fixed number of slots ``P`` per layer and the
host owns it (the layout of Qualcomm's own LLM runners):

- inputs: ``input_ids [1, N]``, ``position_ids [1, N]``, ``attention_mask [1, 1, N, P + N]``
  (additive: 0 where a key is visible, the finite mask value elsewhere), and per layer
  ``past_key_i``/``past_value_i [1, kv_heads, P, head_dim]``;
- outputs: ``logits [1, N, vocab]`` and per layer ``present_key_i``/``present_value_i
  [1, kv_heads, N, head_dim]``: the entries of the N new tokens (after RoPE), which the host writes
  into its cache at their positions.

The step is written with the transformers model's own modules (projections, norms, MLP, RoPE
table); attention is the eager formula over ``concat(past, new)``. Prefill and decode are the same
module traced at two chunk sizes, so their tensors carry the same names, which is what lets one
calibration quantize both (the KV cache input and output of a layer share one quantizer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.core import ir as oir
from onnxq.core.errors import OnnxqError
from onnxq.core.options import check_mask_value
from onnxq.core.steps import DEFAULT_CHUNK, DEFAULT_CONTEXT, CacheShape, StepRunner, step_inputs
from onnxq.stages.export import (
    CHECK_TEXT,
    DEFAULT_SEQ_LEN,
    EXACTNESS_TOL,
    _register_attention,
    export_model,
    save_side_files,
    trace,
)

log = logging.getLogger(__name__)


def cache_shape(config: Any, slots: int) -> CacheShape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheShape(config.num_hidden_layers, config.num_key_value_heads or heads, head_dim, slots)


def _step_module(hf_model: Any, max_positions: int) -> Any:
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    class CachedStep(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner.model
            self.lm_head = inner.lm_head
            cfg = inner.config
            self.heads = cfg.num_attention_heads
            self.kv_heads = cfg.num_key_value_heads or self.heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
            positions = torch.arange(max_positions, dtype=torch.int64).reshape(1, -1)
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = self.model.rotary_emb(probe, positions)
            self.register_buffer("rope_cos", cos[0].contiguous(), persistent=False)  # [max_positions, head_dim]
            self.register_buffer("rope_sin", sin[0].contiguous(), persistent=False)

        def forward(self, input_ids: Any, position_ids: Any, attention_mask: Any, *past: Any) -> tuple[Any, ...]:
            n = input_ids.shape[1]
            h = self.model.embed_tokens(input_ids)
            cos = torch.nn.functional.embedding(position_ids, self.rope_cos)  # Gather from a constant table
            sin = torch.nn.functional.embedding(position_ids, self.rope_sin)
            presents = []
            for i, layer in enumerate(self.model.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, n, self.heads, self.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
                v = attn.v_proj(x).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
                if hasattr(attn, "q_norm"):  # Qwen3
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                presents += [k, v]
                keys = repeat_kv(torch.cat([past[2 * i], k], dim=2), self.heads // self.kv_heads)
                values = repeat_kv(torch.cat([past[2 * i + 1], v], dim=2), self.heads // self.kv_heads)
                scores = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling + attention_mask
                probs = torch.softmax(scores, dim=-1)
                out = torch.matmul(probs, values).transpose(1, 2).reshape(1, n, -1)
                h = h + attn.o_proj(out)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = self.lm_head(self.model.norm(h))
            return (logits, *presents)

    return CachedStep(hf_model).eval()


def export_step(
    hf_model: Any,
    output: Path,
    *,
    chunk: int,
    slots: int,
    mask_value: float,
    max_positions: int | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[Path, float]:
    """Export the cached step at chunk size ``chunk``; returns the path and the export seconds.

    ``max_positions`` sizes the RoPE table; prefill and decode share one size so that their tables
    (constants the quantizer encodes once for both) are the same tensor.
    """
    import torch

    start = time.perf_counter()
    shape = cache_shape(hf_model.config, slots)
    module = _step_module(hf_model, max_positions or slots + chunk)
    feeds = step_inputs(np.arange(chunk) % hf_model.config.vocab_size, 0, chunk, shape, mask_value)
    past = shape.empty()
    args = tuple(torch.from_numpy(v) for v in (*feeds.values(), *past.values()))
    outputs = ["logits"] + [f"present_{kv}_{i}" for i in range(shape.layers) for kv in ("key", "value")]
    with torch.no_grad():
        model = trace(module, args, [*feeds, *past], outputs)
    model.metadata_props.update(
        {
            "onnxq.kv_chunk": str(chunk),
            "onnxq.kv_slots": str(slots),
            "onnxq.mask_value": repr(float(mask_value)),
            "onnxq.vocab_size": str(hf_model.config.vocab_size),
            "onnxq.seq_len": str(chunk),
            **(metadata or {}),
        }
    )
    oir.save(model, output)
    return output, time.perf_counter() - start


@dataclass
class KVExportResult:
    folder: Path
    files: list[Path]
    chunk: int
    slots: int
    max_abs_diff: float  # prefill + decode, and the scoring graph, against transformers on the check text
    seconds: float


def check_against(hf_model: Any, folder: Path, ids: np.ndarray) -> float:
    """Max |logits| difference between the step graphs and transformers: all but the last 4 tokens
    through prefill (chunked), the last 4 one by one through decode."""
    import onnxruntime as ort
    import torch

    def cpu(path: Path) -> Any:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    stepper = StepRunner(folder / "prefill.onnx", folder / "decode.onnx", cpu)
    cut = max(len(ids) - 4, 1)
    got = np.concatenate([stepper.step(ids[:cut]), *(stepper.step([t]) for t in ids[cut:])])
    with torch.no_grad():
        ref = hf_model(input_ids=torch.as_tensor(ids).reshape(1, -1), use_cache=False).logits[0].numpy()
    return float(np.abs(got - ref).max())


def export_kv_model(
    hf_model: Any,
    folder: Path,
    *,
    chunk: int = DEFAULT_CHUNK,
    context: int = DEFAULT_CONTEXT,
    mask_value: float = -100.0,
    metadata: dict[str, str] | None = None,
    check_ids: np.ndarray | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    tokenizer: Any = None,
) -> KVExportResult:
    """Write ``prefill.onnx`` (chunk N) and ``decode.onnx`` (1 token) with ``context`` cache slots into
    ``folder``, and the scoring graph ``model.onnx`` (``seq_len`` tokens) they are quantized as."""

    _check_lengths(chunk, context)
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(_register_attention(mask_value))  # the reference uses the finite mask too
    try:
        files = [
            export_step(
                hf_model,
                folder / name,
                chunk=n,
                slots=context,
                mask_value=mask_value,
                max_positions=context + chunk,
                metadata=metadata,
            )[0]
            for name, n in (("prefill.onnx", chunk), ("decode.onnx", 1))
        ]
        if check_ids is None:
            check_ids = np.arange(chunk + 4) % hf_model.config.vocab_size
        diff = check_against(hf_model, folder, np.asarray(check_ids[: min(len(check_ids), context)]))
    finally:
        hf_model.set_attn_implementation(previous)
    scoring = export_model(
        hf_model, folder / "model.onnx", seq_len=seq_len, mask_value=mask_value, metadata=metadata, tokenizer=tokenizer
    )
    files = [*scoring.files, *files]
    diff = max(diff, scoring.max_abs_diff)
    return KVExportResult(folder, files, chunk, context, diff, time.perf_counter() - start)


def _check_lengths(chunk: int, context: int) -> None:
    if not 1 < chunk <= context:
        raise OnnxqError(f"--chunk {chunk} must be between 2 and --context {context}", "pass e.g. --chunk 64")


def export_kv(
    model: str | None,
    folder: str | Path,
    *,
    chunk: int = DEFAULT_CHUNK,
    context: int = DEFAULT_CONTEXT,
    mask_value: float = -100.0,
    seq_len: int = DEFAULT_SEQ_LEN,
    overwrite: bool = False,
    progress: Any = None,
) -> KVExportResult:
    """Export MODEL's prefill and decode graphs, its scoring graph and tokenizer into the folder ``folder``."""
    step = progress or (lambda _stage: None)
    from onnxq.core.files import atomic_dir, check_new_output
    from onnxq.core.sources import load_model, load_tokenizer, resolve

    folder = Path(folder)
    if folder.suffix == ".onnx":
        raise OnnxqError(f"with --kv-cache, -o {folder} names a folder", f"use e.g. -o {folder.with_suffix('')}/")
    check_new_output(folder, overwrite=overwrite)
    _check_lengths(chunk, context)
    check_mask_value(mask_value)
    if seq_len < 1:
        raise OnnxqError(f"--seq-len {seq_len} is not a positive length", "pass e.g. --seq-len 512")
    source = resolve(model)
    step("loading the model")
    hf_model = load_model(source)
    tokenizer = load_tokenizer(source)
    step(f"exporting prefill ({chunk} tokens), decode (1 token) and scoring ({seq_len}), checking against transformers")
    ids = np.asarray(tokenizer(CHECK_TEXT * 4, return_attention_mask=False)["input_ids"][: chunk + 8])
    meta = {"onnxq.source": source.label or source.ref, "onnxq.model_type": hf_model.config.model_type}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        result = export_kv_model(
            hf_model,
            tmp,
            chunk=chunk,
            context=context,
            mask_value=mask_value,
            metadata=meta,
            check_ids=ids,
            seq_len=seq_len,
            tokenizer=tokenizer,
        )
        save_side_files(tmp, tokenizer=tokenizer, config=hf_model.config)
    result.folder = folder
    result.files = [folder / p.name for p in result.files]
    if not result.max_abs_diff <= EXACTNESS_TOL:
        log.warning("step graphs differ from transformers by %.3g (> %g)", result.max_abs_diff, EXACTNESS_TOL)
    return result

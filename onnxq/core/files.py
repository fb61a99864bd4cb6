"""Writing outputs without ever leaving a half-written file or touching the input.

Every file onnxq writes goes to a temporary name in the destination folder first and is moved into
place with :func:`os.replace`, so a reader sees the old file or the complete new one. Output
folders are assembled under a temporary name and swapped in the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from onnxq.core.errors import OnnxqError

#: files that travel with a model from folder to folder (tokenizer and config)
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
)
#: files that travel with a quantized model into what is made of it (compiled, packaged): the side files
#: and what the quantizer did
CARRIED = (*SIDE_FILES, "recipe.toml", "summary.json", "precision_map.json")


def check_new_output(path: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that would clobber an input."""
    path = Path(path)
    resolved = path.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == resolved or resolved in src.parents:
            raise OnnxqError(f"output {path} would overwrite the input {src}", "choose another output path")
    if path.exists() and not overwrite:
        raise OnnxqError(f"output {path} already exists", "pass --overwrite or choose another path")
    _check_writable(path)


def _check_writable(path: Path) -> None:
    """Refuse, before any work, an output whose folder cannot be created or written."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    fix = "choose an output path in a folder you can write to"
    if not folder.is_dir():
        raise OnnxqError(f"cannot write {path}: {folder} is a file, not a folder", fix)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OnnxqError(f"cannot write {path}: {folder} is not writable ({exc.strerror})", fix) from None


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``path`` when the block succeeds.

    An existing ``path`` (allowed only with ``overwrite``) is moved aside and deleted only after the
    new folder is in place.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OnnxqError(f"output {path} already exists", "pass --overwrite or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

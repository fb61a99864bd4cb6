"""Text for calibration and evaluation, cut into fixed-length token windows.

Named datasets resolve to a data folder (``$ONNXQ_DATA``, or ``shared/data`` in or next to the working
directory or the checkout), then to the copies shipped in ``calib/datasets`` (compressed), then, with
the ``hub`` extra installed, to the Hugging Face Hub. Any ``.txt`` or ``.jsonl`` (``text`` field)
path works too, compressed (``.gz``, ``.bz2``) or not.

WikiText-2 is read as published results read it: rows are the file's lines, a non-blank line becomes
``line + "\\n"``, a blank one ``""``, rows are joined with ``"\\n\\n"`` and tokenized once; windows are
consecutive and non-overlapping.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from onnxq.core.errors import OnnxqError

#: name -> path inside the shared data folder
NAMED = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "wikitext2-valid": "wikitext-2/wiki.valid.tokens",
    "c4": "c4/c4_validation_1k.jsonl",
}
#: the copies shipped with onnxq (licences and sources in its README)
SHIPPED = Path(__file__).resolve().parent / "datasets"
#: name -> (dataset, config, split, field) on the Hub, for machines with internet
HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2-valid": ("wikitext", "wikitext-2-v1", "validation", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}


def data_dirs() -> list[Path]:
    """Folders searched for the shared data, first match wins."""
    dirs = []
    if os.environ.get("ONNXQ_DATA"):
        dirs.append(Path(os.environ["ONNXQ_DATA"]))
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        dirs += [base / "shared" / "data", base.parent / "shared" / "data"]
    return [*dirs, SHIPPED]


def find_data(rel: str) -> Path | None:
    """``rel`` in the first data folder that has it, as is or gzip-compressed."""
    for folder in data_dirs():
        for candidate in (folder / rel, folder / f"{rel}.gz"):
            if candidate.exists():
                return candidate
    return None


def find_named(name: str) -> Path | None:
    """The local file for a named dataset, if present."""
    return find_data(NAMED[name])


def open_text(path: Path) -> IO[str]:
    """A text file, read through gzip or bz2 when its name says it is compressed."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _stem(path: Path) -> Path:
    """``path`` without a compression suffix."""
    return path.with_suffix("") if path.suffix in (".gz", ".bz2") else path


def wikitext_rows(lines: Sequence[str]) -> str:
    """Join WikiText lines the way the HF dataset and the benchmarks do."""
    rows = [line + "\n" if line.strip() else "" for line in lines]
    return "\n\n".join(rows)


def read_text(source: str | os.PathLike) -> str:
    """The text of a named dataset or a file (.txt, .raw, .tokens or .jsonl with a ``text`` field)."""
    name = str(source)
    if name in NAMED:
        path = find_named(name)
        if path is None:
            return _hub_text(name)
        return read_text(path)
    path = Path(name)
    if not path.exists():
        known = ", ".join(sorted(NAMED))
        raise OnnxqError(
            f"calibration/evaluation data {name!r} not found", f"pass a .txt/.jsonl file or one of: {known}"
        )
    if path.is_dir():
        raise OnnxqError(f"{path} is a folder", "pass a .txt or .jsonl file")
    try:
        text = _read_file(path)
    except (UnicodeDecodeError, EOFError, OSError) as exc:  # binary, or a truncated archive
        raise OnnxqError(f"cannot read {path} as text ({type(exc).__name__})", "pass a UTF-8 .txt or .jsonl") from None
    if not text.strip():
        raise OnnxqError(f"{path} holds no text", "pass a file with calibration text")
    return text


def _read_file(path: Path) -> str:
    if _stem(path).suffix == ".jsonl":
        texts = []
        with open_text(path) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise OnnxqError(f"{path}:{i} is not valid JSON", "pass one JSON object per line") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise OnnxqError(f"{path}:{i} has no 'text' field", 'write lines like {"text": "..."}')
                texts.append(str(record["text"]))
        return "\n\n".join(texts)
    with open_text(path) as fh:
        raw = fh.read()
    return wikitext_rows(raw.splitlines()) if path.name.startswith("wiki.") else raw


def _hub_text(name: str) -> str:
    dataset, config, split, field = HUB[name]
    try:
        import datasets  # optional: only for machines with internet and no local copy
    except ImportError:
        raise OnnxqError(
            f"dataset {name!r} is in no data folder and `datasets` is not installed",
            "set ONNXQ_DATA to a folder holding it, or `pip install 'onnxq[hub]'` on a machine with internet",
        ) from None
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:
        raise OnnxqError(f"could not fetch {name!r} from the Hub ({type(exc).__name__})", "set ONNXQ_DATA") from None
    rows = ds[field]
    if name.startswith("wikitext"):
        return "\n\n".join(rows)
    return "\n\n".join(rows[:1000])


@dataclass(frozen=True)
class Windows:
    """Token windows ``[n, seq_len]`` cut from one text, and where they came from."""

    ids: np.ndarray
    source: str
    total_tokens: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Tokenize once, as the convention asks (special tokens as the tokenizer adds them)."""
    ids = tokenizer(text)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def windows(tokenizer: Any, source: str | os.PathLike, seq_len: int, count: int | None = None) -> Windows:
    """The first ``count`` (default: all) non-overlapping windows of ``seq_len`` tokens."""
    return cut(tokenize(tokenizer, read_text(source)), source, seq_len, count)


def cut(ids: np.ndarray, source: str | os.PathLike, seq_len: int, count: int | None = None) -> Windows:
    """:func:`windows` of tokens read before (a length known only later)."""
    available = len(ids) // seq_len
    if available == 0:
        raise OnnxqError(
            f"{source} has {len(ids)} tokens, fewer than one window of {seq_len}",
            "pass more text or a shorter --seq-len",
        )
    n = available if count is None else min(count, available)
    if count is not None and count > available:
        raise OnnxqError(
            f"{source} has only {available} windows of {seq_len} tokens, {count} asked", "pass fewer windows"
        )
    return Windows(ids[: n * seq_len].reshape(n, seq_len), str(source), len(ids))

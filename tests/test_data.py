"""Token windows follow the WikiText-2 convention of shared/data/README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from calib.data import find_named, read_text, wikitext_rows, windows
from onnxq.errors import OnnxqError


def test_wikitext_rows_convention() -> None:
    assert wikitext_rows([" = Title = ", " ", "text"]) == " = Title = \n\n\n\n\ntext\n"


def test_wikitext_file_is_joined_like_the_hf_dataset() -> None:
    path = find_named("wikitext2")
    assert path is not None
    text = read_text("wikitext2")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4358
    assert lines[0] == " " and lines[1] == " = Robert Boulter = "  # a blank row, then a title row
    assert text.startswith("\n\n = Robert Boulter = \n\n\n")


def test_windows_are_consecutive_and_non_overlapping(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    w = windows(tok, "wikitext2", 32, 3)
    ids = tok(read_text("wikitext2"), return_attention_mask=False)["input_ids"]
    assert w.ids.shape == (3, 32)
    assert w.ids.reshape(-1).tolist() == ids[:96]


def test_jsonl_needs_a_text_field(tmp_path: Path) -> None:
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(OnnxqError, match="no 'text' field"):
        read_text(bad)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "calib.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(OnnxqError, match="holds no text"):
        read_text(empty)

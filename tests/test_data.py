"""Token windows follow the WikiText-2 convention of published results; the data ships with onnxq."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from calib import data
from calib.data import SHIPPED, find_named, open_text, read_text, wikitext_rows, windows
from onnxq.core.errors import OnnxqError
from onnxq.evaluation import zeroshot

#: the upstream files' sha256 (calib/datasets/README.md), checked on the decompressed shipped copies
UPSTREAM = {
    "wikitext-2-raw/wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    "wikitext-2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "c4/c4_validation_1k.jsonl": "ffa8ce32f608da046afc80e2625262cd0eabd39fd3f71acab4909ff4f4226cb2",
    "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
}


@pytest.mark.parametrize("rel", sorted(UPSTREAM))
def test_the_shipped_copies_are_the_upstream_files(rel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "data_dirs", lambda: [SHIPPED])  # as in a clone with no data folder beside it
    path = data.find_data(rel)
    assert path is not None and path.is_relative_to(SHIPPED)
    with open_text(path) as fh:
        assert hashlib.sha256(fh.read().encode("utf-8")).hexdigest() == UPSTREAM[rel]


def test_every_named_set_and_task_resolves_without_a_data_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "data_dirs", lambda: [SHIPPED])
    assert len(read_text("c4")) > 2_000_000 and read_text("wikitext2").startswith("\n\n = Robert Boulter = ")
    assert "<unk>" in read_text("wikitext2-valid")
    assert [i.gold for i in zeroshot.load("piqa", limit=3)] == [0, 1, 1]
    assert len(zeroshot.load("hellaswag")) == 10042


def test_wikitext_rows_convention() -> None:
    assert wikitext_rows([" = Title = ", " ", "text"]) == " = Title = \n\n\n\n\ntext\n"


def test_wikitext_file_is_joined_like_the_hf_dataset() -> None:
    path = find_named("wikitext2")
    assert path is not None
    text = read_text("wikitext2")
    with open_text(path) as fh:
        lines = fh.read().splitlines()
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

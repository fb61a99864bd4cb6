"""onnxq report: one self-contained HTML page whose figures are all there and not empty."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from onnxq.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            a = dict(attrs)
            src = a.get("src") or ""
            assert src.startswith("data:image/png;base64,"), "figures are embedded, not linked"
            self.images[a.get("alt") or ""] = base64.b64decode(src.split(",", 1)[1])


def test_the_report_embeds_every_figure(
    tiny_w8a16: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "out"
    shutil.copytree(tiny_w8a16, folder)
    argv = ["report", str(folder), "--model", str(tiny_model), "--data", "wikitext2-valid", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = {"rotation", "layer_error", "ranges", "precision", "bench"}
    assert expected <= set(data["figures"])
    assert set(data["skipped"]) == {"sensitivity", "learning"}  # no --budget, no --learn in this run
    parser = _Images()
    parser.feed((folder / "report.html").read_text(encoding="utf-8"))
    assert set(parser.images) == set(data["figures"])
    for name, png in parser.images.items():
        assert png.startswith(PNG) and len(png) > 10_000, name  # a real plot, not an empty canvas
        assert (folder / "report" / f"{name}.png").read_bytes() == png


def test_report_of_a_folder_that_is_not_an_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no summary.json" in err[0]

"""The README's results are the bench's: its block is what tools/readme.py renders from tools/results."""

from __future__ import annotations

import re

from tools import readme


def test_the_readme_results_are_rendered_from_the_bench_json() -> None:
    text = readme.README.read_text(encoding="utf-8")
    found = re.search(re.escape(readme.BEGIN) + ".*?" + re.escape(readme.END), text, re.DOTALL)
    assert found is not None, "README.md lost its results block"
    assert found.group(0) == readme.block(), "README.md's results differ from tools/results: run tools/readme.py"


def test_the_block_changes_with_the_results() -> None:
    bench = readme._load("bench.json")
    bench["rows"]["fp32"]["eval"]["ppl"] += 1.0
    assert readme.block(bench) != readme.block()

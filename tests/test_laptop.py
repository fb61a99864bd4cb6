"""The laptop install: the device-side commands run with torch and transformers unimportable, and a
building command is refused in one line there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from onnxq.core.tokenizer import FileTokenizer
from tests.laptop import WORKSTATION_ONLY

LAPTOP = Path(__file__).with_name("laptop.py")
#: run in a child whose import system has the workstation-only modules blocked
BLOCK = f"import sys; sys.modules.update(dict.fromkeys({WORKSTATION_ONLY!r})); "


def test_device_side_commands_run_without_torch(tiny_w8a16: Path, kv_w8a16: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_w8a16, tmp_path / "w8a16")
    shutil.copytree(kv_w8a16, tmp_path / "kvq")
    run = f"sys.argv = ['laptop', 'run', {str(tmp_path)!r}]; runpy.run_path({str(LAPTOP)!r}, run_name='__main__')"
    code = BLOCK + "import runpy; " + run
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    commands = [
        "check",
        "validate",
        "validate",
        "eval",
        "eval",
        "generate",
        "generate",
        "compile",
        "package",
        "generate",
    ]
    assert report == {"commands": commands, "imported": []}
    assert (tmp_path / "htp" / "model_ctx.onnx").is_file()
    assert (tmp_path / "genai" / "genai_config.json").is_file()


def test_a_building_command_on_the_laptop_install_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    argv = ["quantize", str(tiny_model), "-o", str(tmp_path / "out")]
    code = BLOCK + f"from onnxq.cli import main; sys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "onnxq quantize: error: `onnxq quantize` needs torch and transformers, which the base (laptop) install "
        "leaves out: pip install 'onnxq[quantize]' on the machine that builds the model"
    ]
    assert not (tmp_path / "out").exists()


def test_the_file_tokenizer_gives_the_ids_of_transformers(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    from calib.data import find_named, open_text

    path = find_named("wikitext2")
    assert path is not None
    with open_text(path) as fh:
        text = fh.read()[:100_000]
    ours, theirs = FileTokenizer(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    for special in (True, False):
        ids = ours(text, add_special_tokens=special)["input_ids"]
        assert ids == theirs(text, add_special_tokens=special)["input_ids"]
    assert len(ids) > 10_000
    assert ours.decode(ids[:2000], skip_special_tokens=True) == theirs.decode(ids[:2000], skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) == (0, 1)

"""The laptop install: check, validate, eval, generate, compile and package on a tiny model, without torch.

    python tests/laptop.py build DIR   # needs onnxq[quantize]: a tiny model's W8A16 QDQ and KV pair
    python tests/laptop.py run DIR     # needs only `pip install 'onnxq[genai]'`; fails if torch or transformers loads

``tests/test_laptop.py`` runs both with those modules made unimportable; ``.ci/run`` runs ``run`` in a
fresh virtual environment that holds the base install alone.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

#: what the laptop install leaves out, and what no device-side command may import
WORKSTATION_ONLY = ("torch", "transformers", "matplotlib")


def build(folder: Path) -> None:
    """The tiny model's W8A16 QDQ graph and its quantized prefill/decode pair, each with its tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np

    from onnxq.stages.export_kv import export_kv_model
    from onnxq.stages.pipeline import quantize
    from tests.conftest import export_tiny
    from tests.tiny import tiny_llama, tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(folder)
    quantize(export_tiny(folder, "gqa"), folder / "w8a16", preset="w8a16", calib="wikitext2-valid", windows=2)
    export_kv_model(tiny_llama(), folder / "kv", chunk=8, context=40, check_ids=np.arange(21) * 7 % 384)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(folder / name, folder / "kv" / name)
    quantize(folder / "kv", folder / "kvq", preset="w8a16", calib="wikitext2-valid", windows=2)


def run(folder: Path) -> None:
    """Each device-side command on ``folder``'s models, in this process; raises on a failure or an import."""
    from onnxq.cli import main

    qdq, pair, packaged = str(folder / "w8a16" / "model.qdq.onnx"), str(folder / "kvq"), str(folder / "genai")
    prompt = ["--prompt", "The capital of France is", "--max-new-tokens", "4"]
    commands = [
        ["check", qdq],
        ["validate", qdq, "--windows", "1"],
        ["validate", pair, "--windows", "1"],
        ["eval", qdq, "--ppl", "wikitext2", "--windows", "2"],
        ["eval", pair, "--ppl", "wikitext2", "--windows", "1"],
        ["generate", pair, *prompt],
        ["generate", pair, *prompt, "--ep", "qnn"],
        ["compile", qdq, "-o", str(folder / "htp"), "--overwrite"],
        ["package", pair, "-o", packaged, "--overwrite"],
        ["generate", packaged, *prompt],  # in onnxruntime-genai
    ]
    for argv in commands:
        code = main([argv[0], "-q", *argv[1:]])
        if code != 0:
            raise SystemExit(f"laptop: `onnxq {' '.join(argv)}` exited {code}")
    loaded = [name for name in WORKSTATION_ONLY if sys.modules.get(name) is not None]
    if loaded:
        raise SystemExit(f"laptop: the device-side commands imported {', '.join(loaded)}")
    print(json.dumps({"commands": [a[0] for a in commands], "imported": loaded}))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "run"):
        raise SystemExit(__doc__)
    {"build": build, "run": run}[sys.argv[1]](Path(sys.argv[2]))

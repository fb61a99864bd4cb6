"""The import direction (README, "Layout"): a module imports only from its own layer or the layers below."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: lowest first; ``onnxq`` itself (the API, the CLI) is the top
LAYERS = (
    "onnxq.core",
    "rewrites",
    "onnxq.plan",
    "calib",
    "onnxq.stages",
    "onnxq.device",
    "onnxq.evaluation",
    "onnxq",
)


def layer(module: str) -> int | None:
    """The layer of a first-party module (None for a third-party one): its longest matching prefix."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS.index(max(matches, key=len)) if matches else None


def imports(path: Path, module: str) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function; ``from pkg import mod`` counts as pkg.mod."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            base = ROOT / node.module.replace(".", "/")
            out += [f"{node.module}.{a.name}" for a in node.names if (base / f"{a.name}.py").exists()]
    return out


def test_every_import_points_down() -> None:
    upward = []
    for package in ("onnxq", "rewrites", "calib"):
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            own = layer(module)
            assert own is not None, module
            for target in imports(path, module):
                rank = layer(target)
                if rank is not None and rank > own:
                    upward.append(f"{module} ({LAYERS[own]}) imports {target} ({LAYERS[rank]})")
    assert not upward, "\n".join(upward)


def test_an_upward_import_is_seen(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from onnxq.stages.pipeline import quantize\n", encoding="utf-8")
    assert layer("onnxq.core.ir") == 0 and layer("onnxq.plan") == 2 and layer("onnxq.stages.pipeline") == 4
    assert [layer(t) for t in imports(source, "rewrites.bad")] == [4]


def test_the_api_names_stay_functions() -> None:
    """No room shares a name with the API: importing a module never replaces ``onnxq.export`` and the rest."""
    import importlib

    import onnxq

    for name, (module, _) in onnxq._LAZY.items():
        importlib.import_module(module)
        assert not isinstance(getattr(onnxq, name), type(onnxq)), name


def test_the_rooms_find_the_files_beside_the_package() -> None:
    """Modules that moved into rooms still find the model-family recipes and the bench results."""
    from onnxq.core import recipes
    from onnxq.evaluation import report

    assert recipes.for_model_type("llama").family == "llama" and recipes.for_model_type("llama").split_outliers > 0
    assert report.BENCH == ROOT / "tools" / "results" / "bench.json"

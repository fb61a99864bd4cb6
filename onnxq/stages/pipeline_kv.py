"""Quantize the generation graphs (prefill + decode, from ``onnxq export --kv-cache``) as the scoring graph.

The folder holds the scoring graph (``model.onnx``) beside the pair, exported from one model in one
run. The scoring graph goes through every stage of :func:`~onnxq.stages.run.run_stages`; the
prefill and decode graphs are prepared with the same rewrites and outlier channels and then take
its widths, encodings and weights point by point (:mod:`~onnxq.stages.follow`). So the pair computes
what the scoring QDQ graph computes, whatever the options. A layer's KV cache is one point with the
keys after RoPE (or the values) it holds, at the cache's width in all three graphs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import onnx_ir as ir

from onnxq.core import ir as oir
from onnxq.core import memory
from onnxq.core import presets as presets_mod
from onnxq.core.errors import OnnxqError
from onnxq.core.files import check_new_output
from onnxq.core.options import PAIR_E2E_GROUPS, QuantizeOptions
from onnxq.core.recipes import Recipe
from onnxq.core.steps import read_shape
from onnxq.stages.follow import cache_widths, follow
from onnxq.stages.prepare import Prepared, Progress, prepare
from onnxq.stages.qdq import emit_qdq
from onnxq.stages.results import QuantizeResult
from onnxq.stages.run import run_stages, write_run

GRAPHS = ("prefill", "decode")
SCORING = "model.onnx"


def is_kv_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f"{g}.onnx").exists() for g in GRAPHS)


def quantize_kv(
    folder: Path, output: Path, o: QuantizeOptions, *, overwrite: bool, progress: Progress | None
) -> QuantizeResult:
    """Quantize ``folder``'s model.onnx, prefill.onnx and decode.onnx into ``output`` (see the module docstring)."""
    start = time.perf_counter()
    check_new_output(output, overwrite=overwrite, inputs=[folder])
    loose = [g for g in o.learn.e2e_groups if g not in PAIR_E2E_GROUPS] if o.learn and o.learn.e2e_steps else []
    if loose:
        raise OnnxqError(
            f"--e2e-groups {','.join(loose)} is not carried into a prefill/decode pair: learned activation ranges"
            " move its logits off the scoring graph's, which the weights' steps and the cache's ranges do not",
            f"quantize the pair with --e2e-groups {','.join(PAIR_E2E_GROUPS)} (or fewer)",
        )
    scoring = folder / SCORING
    if not scoring.exists():
        raise OnnxqError(
            f"{folder} has no scoring graph {SCORING}, which the prefill and decode graphs are quantized as",
            f"export it again with this version into a new folder: onnxq export MODEL --kv-cache -o {folder}-new",
        )
    chunk, shape, _ = read_shape(folder / "prefill.onnx")

    def like_leader(graph: str, leader: Prepared, resolved: QuantizeOptions) -> Prepared:
        """``graph`` prepared as the scoring graph was (its rotations are then overwritten by the
        leader's weights, learned ones included)."""
        assert resolved.online_hadamard is not None
        return prepare(
            oir.load(folder / f"{graph}.onnx"),
            mask_value=o.mask_value,
            rotate="hadamard" if o.rotate == "learned" else o.rotate,
            online=resolved.online_hadamard,
            seed=o.seed,
            where=str(folder / f"{graph}.onnx"),
            outliers=(lambda _m, _s: leader.channels) if leader.channels else None,
        )

    def pin_cache(leader: Prepared, resolved: QuantizeOptions, recipe: Recipe) -> Mapping[str, int]:
        """The points holding the cache keep the cache's width in all three graphs (prefill is prepared
        here for its cache points only, and again to follow: no float follower is held through the run)."""
        return cache_widths(like_leader("prefill", leader, resolved), leader, presets_mod.get(o.preset), recipe)

    scratch = output.parent / f".{output.name}.learn"
    run = run_stages(scoring, oir.load(scoring), o, progress=progress, scratch=scratch, pins=pin_cache)
    graphs: dict[str, ir.Model] = {}
    for g in GRAPHS:  # one float follower at a time: only its QDQ form (quantized weights) is kept
        follower = like_leader(g, run.prepared, run.resolved)
        plan, encodings = follow(follower, run.prepared, run.plan, run.encodings, run.recipe)
        follower.model.metadata_props.update(run.metadata)
        graphs[f"{g}.qdq.onnx"] = emit_qdq(follower.model, plan, encodings)
        del follower
        memory.release()  # its float weights, before the next follower is loaded
    graphs = {"model.qdq.onnx": emit_qdq(run.prepared.model, run.plan, run.encodings), **graphs}
    kv = {"chunk": chunk, "context": shape.slots, "layers": shape.layers}
    return write_run(
        run,
        output,
        graphs,
        [scoring, *(folder / f"{g}.onnx" for g in GRAPHS)],
        source=folder,
        started=start,
        overwrite=overwrite,
        summary={"kv_cache": kv},
    )

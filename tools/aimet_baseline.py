"""Qualcomm AIMET's QuantSim (aimet-onnx), run as a user would, on the calibration windows onnxq uses.

The graph is onnxq's canonical float graph (finite mask, untied embedding, fused RMSNorm), as for the
strongest ONNX Runtime rows; the HTP v73 configuration (per-channel weights; the lm_head at 8 bits,
as onnxq keeps it); the scheme is min/max
or AIMET's tf_enhanced (a search over each activation's histogram). The calibrated model is exported
as a QDQ graph and evaluated like every other row.

aimet-onnx is not part of onnxq's toolchain: its onnx2torch dependency pulls torchvision and a newer
torch, so it is installed without its dependencies, and those it needs for QuantSim from the
``aimet`` extra::

    pip install --no-deps aimet-onnx==2.42.0 && pip install -e ".[aimet]"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnxq.stages.metrics import peak_rss_mb
from tools.ort_baseline import canonical_graph, lm_head_weight

#: preset -> (weight type, activation type)
TYPES = {"w8a16": ("int8", "int16"), "w8a8": ("int8", "int8"), "w4a16": ("int4", "int16"), "w4a8": ("int4", "int8")}
SCHEMES = {"minmax": "min_max", "tf_enhanced": "tf_enhanced"}


def quantize_with_aimet(model: Path, output: Path, windows: np.ndarray, preset: str, scheme: str) -> dict:
    """Calibrate AIMET's QuantSim of ``model`` and write its QDQ export to ``output``."""
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    path = canonical_graph(model, output)
    graph = onnx.load(path)
    weights, acts = TYPES[preset]
    sim = QuantizationSimModel(
        graph,
        param_type=weights,
        activation_type=acts,
        quant_scheme=SCHEMES[scheme],
        config_file="htp_v73",
        providers=["CPUExecutionProvider"],
    )
    sim.qc_quantize_op_dict[lm_head_weight(path)].set_bitwidth(8)  # as onnxq and Qualcomm's LLM recipes keep it
    sim.compute_encodings([{"input_ids": w.reshape(1, -1).astype(np.int64)} for w in windows])
    onnx.save(sim.to_onnx_qdq(), output)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--preset", default="w8a16", choices=sorted(TYPES))
    parser.add_argument("--scheme", default="minmax", choices=sorted(SCHEMES))
    parser.add_argument("--windows", required=True, help=".npy file of calibration token windows")
    args = parser.parse_args()
    info = quantize_with_aimet(Path(args.model), Path(args.output), np.load(args.windows), args.preset, args.scheme)
    print(json.dumps(info))


if __name__ == "__main__":
    main()

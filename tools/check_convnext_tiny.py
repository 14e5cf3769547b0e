"""Minimize ConvNeXt-Tiny with zeros placed on purpose, exported by both torch exporters.

Random seeded weights; in every block a quarter of the MLP hidden units are dead (zero rows
of pwconv1, biases drawn so that GELU gives nonzero constants) and another eighth are unused
(zero columns of pwconv2); every third block is dead as a whole (zero depthwise conv and zero
pwconv2, so only the layer-scaled pwconv2 bias reaches the stream); some stem filters are zero.
The layer scale is set to 1 so every block matters.

Usage: python tools/check_convnext_tiny.py [--size 224] [--exporter torchscript dynamo]
Prints one line per exporter: parameters before/after, verification error, minimizer time.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import onnx_squeeze
from onnx_squeeze.train.export import export_onnx
from onnx_squeeze.train.models import convnext_tiny
from onnx_squeeze.train.weights import fill_seeded, zero_input_units, zero_output_units

logger = logging.getLogger("check_convnext_tiny")


@torch.no_grad()
def place_zeros(model: torch.nn.Module, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {"dead_hidden": 0, "unused_hidden": 0, "dead_blocks": 0}
    blocks = [block for stage in model.stages for block in stage]
    for number, block in enumerate(blocks):
        block.gamma.fill_(1.0)
        hidden = block.pwconv1.out_features
        if number % 3 == 2:
            block.dwconv.weight.zero_()
            block.dwconv.bias.zero_()
            block.pwconv2.weight.zero_()
            counts["dead_blocks"] += 1
            continue
        order = rng.permutation(hidden)
        dead, unused = order[: hidden // 4], order[hidden // 4: hidden // 4 + hidden // 8]
        zero_output_units(block.pwconv1, dead.tolist(), bias=rng.uniform(-1, 1, len(dead)).tolist())
        zero_input_units(block.pwconv2, unused.tolist())
        counts["dead_hidden"] += len(dead)
        counts["unused_hidden"] += len(unused)
    stem = model.downsample_layers[0][0]
    zero_output_units(stem, [3, 17, 40], bias=0.0)
    return counts


def run(exporter: str, size: int, seed: int, work: Path) -> str:
    model = fill_seeded(convnext_tiny(num_classes=1000), seed=seed)
    counts = place_zeros(model, seed)
    path = work / f"convnext_tiny_{exporter}.onnx"
    started = time.perf_counter()
    export_onnx(model, torch.randn(2, 3, size, size), path, dynamo=exporter == "dynamo", opset=17)
    export_seconds = time.perf_counter() - started

    original = onnx.load(path)
    started = time.perf_counter()
    result = onnx_squeeze.minimize(original, batch_sizes=(1, 2))
    seconds = time.perf_counter() - started
    report = result.report
    line = (
        f"| {exporter} | {report['params_before']:,} | {report['params_after']:,} | "
        f"{report['params_before'] / report['params_after']:.3f}x | {report['macs_before']:,} | "
        f"{report['macs_after']:,} | {report['max_abs_error']:.2e} | {report['verified']} | "
        f"{seconds:.1f} s | {export_seconds:.1f} s |"
    )
    logger.info("%s: zeros placed %s; %d rounds; kept by rule: %s", exporter, counts, report["rounds"],
                [(r["reason"], r["units"]) for r in report["kept_by_rule"]][:5])
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exporter", nargs="+", default=["torchscript", "dynamo"], choices=["torchscript", "dynamo"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    print("| exporter | params before | params after | ratio | MACs before | MACs after | max abs error | verified | minimize time | export time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in args.exporter:
            print(run(exporter, args.size, args.seed, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()

"""Evaluate ONNX MNIST classifiers on the MNIST test set with onnxruntime.

Each model takes float32 pixels in [0, 1] with shape [N, 784] as its only
input and returns class scores with shape [N, 10] as its first output. For
every model the script prints its test accuracy and the number of test images
whose predicted class differs from the first model's prediction, which shows
whether a rewritten model classifies exactly like the original.

Example (from the repository root):

    .venv/bin/python tools/eval_mnist.py models/lenet300_mnist_pruned.onnx squeezed.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mnist_data import DEFAULT_DATA, load_mnist, resolve_from_repo

def predict(model_path: Path, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the model in onnxruntime on CPU and return the predicted class of each image."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ValueError(f"{model_path} has inputs {names}; expected one input of shape [N, 784]")
    input_name = inputs[0].name

    predictions = []
    for start in range(0, len(pixels), batch_size):
        scores = session.run(None, {input_name: pixels[start : start + batch_size]})[0]
        if scores.ndim != 2 or scores.shape[1] != 10:
            raise ValueError(f"{model_path} returned an output of shape {scores.shape}; expected [N, 10]")
        predictions.append(scores.argmax(axis=1))
    return np.concatenate(predictions)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "models",
        nargs="+",
        type=Path,
        metavar="MODEL",
        help="ONNX model files; predictions of the later models are compared with the first",
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="MNIST .npz file with x_test and y_test. A relative path is taken from the repository root",
    )
    parser.add_argument("--batch-size", type=int, default=10000, help="number of images per onnxruntime call")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be a positive integer, got {args.batch_size}")
    missing = [str(path) for path in args.models if not path.is_file()]
    if missing:
        raise SystemExit(f"model file not found: {', '.join(missing)}")

    _, _, pixels, labels = load_mnist(resolve_from_repo(args.data))

    reference = None
    print(f"{'model':<50} {'test accuracy':>13} {'differ from first':>17}")
    for path in args.models:
        predictions = predict(path, pixels, args.batch_size)
        if reference is None:
            reference = predictions
        accuracy = 100.0 * float(np.mean(predictions == labels))
        differing = int(np.sum(predictions != reference))
        print(f"{str(path):<50} {accuracy:>12.2f}% {differing:>17d}")
    print(f"({len(labels)} test images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

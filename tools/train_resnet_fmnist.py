"""Train a small ResNet on Fashion-MNIST, prune it, export it, minimize it, and compare.

Steps: train the dense network briefly; prune in rounds with global L1 unstructured pruning
over every conv and linear weight plus L2 structured pruning of a quarter of the filters of
each 3x3 conv (so that whole filters die, as they do after long unstructured pruning);
fine-tune with the masks fixed after each round; remove the masks; export to ONNX; run
``onnx_squeeze.minimize``; evaluate the masked and the minimized model on the 10,000 test
images with onnxruntime and count the predictions that differ.

Usage: python tools/train_resnet_fmnist.py [--out models/resnet_fmnist_pruned.onnx]
Data: ../shared/datasets/fashion-mnist/ relative to the repository root (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.utils import prune

import onnx_squeeze
from onnx_squeeze.train.export import export_onnx
from onnx_squeeze.train.models import ResNet

logger = logging.getLogger("train_resnet_fmnist")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "fashion-mnist"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def load_fashion_mnist(directory: Path):
    parts = [np.load(directory / f"fashion_mnist_train_part{i}.npz") for i in (1, 2)]
    x_train = np.concatenate([p["x_train"] for p in parts])
    y_train = np.concatenate([p["y_train"] for p in parts])
    test = np.load(directory / "fashion_mnist_test.npz")

    def images(x):
        # uint8 [N, 28, 28] -> normalized float32 [N, 1, 28, 28]
        return ((x.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[:, None]

    return images(x_train), y_train.astype(np.int64), images(test["x_test"]), test["y_test"].astype(np.int64)


def train(model, x, y, *, epochs: float, lr: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = int(epochs * len(x) / 128)
    model.train()
    for step in range(steps):
        batch = torch.randint(0, len(x), (128,), generator=generator)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x[batch])), torch.from_numpy(y[batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            logger.info("step %d/%d loss %.3f", step, steps, loss.item())
    model.eval()


@torch.no_grad()
def accuracy_torch(model, x, y) -> float:
    model.eval()
    predictions = torch.cat([model(torch.from_numpy(x[i:i + 1000])).argmax(1) for i in range(0, len(x), 1000)])
    return float((predictions.numpy() == y).mean())


def predict_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the Fashion-MNIST .npz files")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "resnet_fmnist_pruned.onnx")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1.0, help="dense training epochs")
    parser.add_argument("--rounds", type=int, default=3, help="prune/fine-tune rounds")
    parser.add_argument("--finetune-epochs", type=float, default=0.3, help="fine-tuning epochs per round")
    parser.add_argument("--sparsity", type=float, default=0.85, help="final global unstructured sparsity")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.perf_counter()

    x_train, y_train, x_test, y_test = load_fashion_mnist(args.data)
    model = ResNet(widths=(16, 32, 64), blocks_per_stage=(1, 1, 1), num_classes=10, in_channels=1)
    train(model, x_train, y_train, epochs=args.epochs, lr=2e-3, seed=args.seed)
    dense_accuracy = accuracy_torch(model, x_test, y_test)
    logger.info("dense test accuracy %.4f", dense_accuracy)

    weights = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    filters = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    for round_number in range(1, args.rounds + 1):
        # Cumulative targets: pruning an already pruned tensor prunes the remaining weights.
        target = 1 - (1 - args.sparsity) ** (round_number / args.rounds)
        previous = 1 - (1 - args.sparsity) ** ((round_number - 1) / args.rounds)
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=(target - previous) / (1 - previous))
        if round_number == args.rounds:
            for conv in filters:
                prune.ln_structured(conv, "weight", amount=0.25, n=2, dim=0)
        train(model, x_train, y_train, epochs=args.finetune_epochs, lr=5e-4, seed=args.seed + round_number)
        logger.info("round %d: target sparsity %.3f, test accuracy %.4f", round_number, target,
                    accuracy_torch(model, x_test, y_test))
    for module, name in weights:
        prune.remove(module, name)

    zeros = sum(int((m.weight == 0).sum()) for m, _ in weights)
    total = sum(m.weight.numel() for m, _ in weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, torch.from_numpy(x_test[:2]), args.out, dynamo=False, opset=17)

    masked = onnx.load(args.out)
    result = onnx_squeeze.minimize(masked)
    masked_predictions = predict_onnx(masked, x_test)
    minimized_predictions = predict_onnx(result.model, x_test)
    report = result.report
    print(f"dense test accuracy: {dense_accuracy:.4f}")
    print(f"weight sparsity: {zeros / total:.4f} ({zeros} of {total})")
    print(f"masked ONNX test accuracy: {(masked_predictions == y_test).mean():.4f}")
    print(f"minimized ONNX test accuracy: {(minimized_predictions == y_test).mean():.4f}")
    print(f"predictions that differ: {int((masked_predictions != minimized_predictions).sum())}")
    print(f"parameters: {report['params_before']} -> {report['params_after']}, "
          f"MACs: {report['macs_before']} -> {report['macs_after']}, max abs error {report['max_abs_error']:.2e}, "
          f"verified {report['verified']}, minimizer {report['seconds']:.2f} s")
    print(f"total time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

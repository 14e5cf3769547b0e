"""Train, prune and export the bundled LeNet-300-100 MNIST example model.

The script trains the dense 784-300-100-10 network, prunes its three weight
matrices element-wise with global L1 magnitude pruning over several
prune/fine-tune rounds, and exports the result to ONNX. Pruned weights are
exact zeros, but every tensor keeps its dense shape, so the exported file is
the kind of input that onnx_squeeze shrinks.

The script keeps the sparsest round whose accuracy on a validation split,
held out from the training images, stays close to the dense model's. The test
set is only used for reporting.

Example (from the repository root):

    .venv/bin/python tools/train_lenet300.py
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from mnist_data import DEFAULT_DATA, load_mnist, resolve_from_repo
from onnx_squeeze.train.models import LeNet300

log = logging.getLogger("train_lenet300")

DEFAULT_OUT = "models/lenet300_mnist_pruned.onnx"

PRUNED_LAYERS = ("fc1", "fc2", "fc3")
DEFAULT_SCHEDULE = "0.5,0.75,0.875,0.9375,0.96,0.97,0.975,0.98,0.985"


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
) -> None:
    """Train with Adam, decaying the learning rate to zero over the epochs by a cosine curve.

    Works on both dense and pruned models. For a pruned layer the optimizer
    updates weight_orig, and the pruning hook multiplies it by the fixed mask
    in every forward pass, so pruned weights stay zero.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)

    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Return the predicted class of each row of x."""
    model.eval()
    return model(x).argmax(dim=1).numpy()


def accuracy_percent(predictions: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(predictions == labels))


def weight_sparsity(model: LeNet300) -> dict[str, float]:
    """Return the fraction of zero weight elements per layer and under the key "overall".

    Biases are not counted. For a layer that is still pruned, `layer.weight`
    is the masked weight, so the figures are the same before and after
    prune.remove.
    """
    sparsity = {}
    zeros_total = 0
    elements_total = 0
    for name in PRUNED_LAYERS:
        weight = getattr(model, name).weight
        zeros = int((weight == 0).sum())
        sparsity[name] = zeros / weight.numel()
        zeros_total += zeros
        elements_total += weight.numel()
    sparsity["overall"] = zeros_total / elements_total
    return sparsity


def format_sparsity(sparsity: dict[str, float]) -> str:
    return ", ".join(f"{name} {100.0 * value:.2f}%" for name, value in sparsity.items())


def prune_to(model: LeNet300, target: float) -> None:
    """Prune the three weight matrices together by global L1 magnitude to the target sparsity.

    global_unstructured takes `amount` as a fraction of the weights that are
    still unpruned, so the target fraction of all weights is converted first.
    """
    current = weight_sparsity(model)["overall"]
    amount = 1.0 - (1.0 - target) / (1.0 - current)
    prune.global_unstructured(
        [(getattr(model, name), "weight") for name in PRUNED_LAYERS],
        pruning_method=prune.L1Unstructured,
        amount=amount,
    )


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export the model to a single ONNX file and check that no external data file appeared."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files_before = set(path.parent.iterdir())

    example = torch.zeros(1, 784)
    with warnings.catch_warnings():
        # dynamo=False selects the TorchScript-based exporter, which emits each
        # nn.Linear as one Gemm node with transB=1. torch 2.13 warns that this
        # exporter is deprecated.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript.*")
        torch.onnx.export(
            model.eval(),
            example,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        )

    # NOTE: a file that another process writes into the same directory during
    # the export also trips this check.
    new_files = set(path.parent.iterdir()) - files_before - {path}
    if new_files:
        names = sorted(str(p) for p in new_files)
        raise RuntimeError(f"ONNX export of {path} also wrote {names}; expected a single file")

    onnx_model = onnx.load(str(path), load_external_data=False)
    for tensor in onnx_model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"initializer {tensor.name} in {path} uses external data")
    onnx.checker.check_model(onnx_model)
    log.info("wrote %s (%d bytes)", path, path.stat().st_size)


def check_onnx_matches_torch(
    path: Path, x_test: np.ndarray, y_test: np.ndarray, torch_predictions: np.ndarray
) -> float:
    """Run the ONNX file in onnxruntime on the test set and raise if its accuracy differs from torch's.

    Returns the onnxruntime test accuracy in percent.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"pixels": x_test})[0]
    onnx_predictions = logits.argmax(axis=1)

    torch_accuracy = accuracy_percent(torch_predictions, y_test)
    onnx_accuracy = accuracy_percent(onnx_predictions, y_test)
    differing = int(np.sum(onnx_predictions != torch_predictions))
    log.info(
        "onnxruntime check of %s: test accuracy %.2f%% (torch %.2f%%), %d predictions differ from torch",
        path.name,
        onnx_accuracy,
        torch_accuracy,
        differing,
    )
    if onnx_accuracy != torch_accuracy:
        raise RuntimeError(
            f"onnxruntime test accuracy of {path} is {onnx_accuracy:.2f}%, "
            f"but the torch model scores {torch_accuracy:.2f}%"
        )
    return onnx_accuracy


def parse_schedule(text: str) -> list[float]:
    try:
        targets = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid sparsity schedule {text!r}: {error}") from None
    if not targets:
        raise argparse.ArgumentTypeError("the sparsity schedule is empty")
    if any(not 0.0 < t < 1.0 for t in targets) or targets != sorted(set(targets)):
        raise argparse.ArgumentTypeError(
            f"invalid sparsity schedule {text!r}: expected strictly increasing fractions between 0 and 1"
        )
    return targets


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="MNIST .npz file with x_train, y_train, x_test, y_test. A relative path is taken from the repository root",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="output path of the pruned ONNX model. A relative path is taken from the repository root",
    )
    parser.add_argument(
        "--dense-out",
        default=None,
        help="also write the dense model before pruning to this ONNX path (relative to the repository root)",
    )

    parser.add_argument("--seed", type=int, default=0, help="seed for torch and numpy")

    parser.add_argument("--epochs", type=positive_int, default=15, help="dense training epochs")
    parser.add_argument(
        "--finetune-epochs", type=positive_int, default=8, help="fine-tuning epochs after each pruning round"
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size")

    parser.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate for dense training")
    parser.add_argument(
        "--finetune-lr", type=float, default=5e-4, help="initial Adam learning rate of each fine-tuning round"
    )

    parser.add_argument(
        "--schedule",
        type=parse_schedule,
        default=DEFAULT_SCHEDULE,
        metavar="S1,S2,...",
        help="comma-separated overall weight sparsity after each pruning round, as fractions",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="keep the sparsest round whose validation accuracy is at most this many "
        "percentage points below the dense model's",
    )
    parser.add_argument(
        "--val-size",
        type=positive_int,
        default=10000,
        help="number of training images held out for validation",
    )

    parser.add_argument("--threads", type=positive_int, default=2, help="number of torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    data_path = resolve_from_repo(args.data)
    out_path = resolve_from_repo(args.out)
    x_train_all, y_train_all, x_test_np, y_test = load_mnist(data_path)
    log.info("loaded %s: %d training and %d test images", data_path, len(x_train_all), len(x_test_np))

    if args.val_size >= len(x_train_all):
        raise ValueError(f"--val-size {args.val_size} must be smaller than the {len(x_train_all)} training images")
    split = rng.permutation(len(x_train_all))
    val_index, train_index = split[: args.val_size], split[args.val_size :]
    x_train = torch.from_numpy(x_train_all[train_index])
    y_train = torch.from_numpy(y_train_all[train_index])
    x_val = torch.from_numpy(x_train_all[val_index])
    y_val = y_train_all[val_index]
    x_test = torch.from_numpy(x_test_np)

    model = LeNet300()
    train_epochs(model, x_train, y_train, args.epochs, args.lr, args.batch_size, rng)
    dense_val = accuracy_percent(predict(model, x_val), y_val)
    dense_test = accuracy_percent(predict(model, x_test), y_test)
    log.info("dense model: validation accuracy %.2f%%, test accuracy %.2f%%", dense_val, dense_test)

    if args.dense_out is not None:
        dense_path = resolve_from_repo(args.dense_out)
        export_onnx(model, dense_path)
        check_onnx_matches_torch(dense_path, x_test_np, y_test, predict(model, x_test))

    # Each round prunes the previous round's model further and fine-tunes it
    # with the mask fixed. All rounds run, and the sparsest round whose
    # validation accuracy is at most --max-drop points below the dense model's
    # is kept. A round that misses the limit does not end pruning, because the
    # validation figure is noisy and a later, longer-tuned round can pass.
    accepted = None
    accepted_round = 0
    current = model
    for round_number, target in enumerate(args.schedule, start=1):
        current = copy.deepcopy(current)
        prune_to(current, target)
        train_epochs(current, x_train, y_train, args.finetune_epochs, args.finetune_lr, args.batch_size, rng)
        val = accuracy_percent(predict(current, x_val), y_val)
        test = accuracy_percent(predict(current, x_test), y_test)
        within_limit = dense_val - val <= args.max_drop
        log.info(
            "round %d: sparsity %s, validation accuracy %.2f%% (%+.2f points against dense, %s), test accuracy %.2f%%",
            round_number,
            format_sparsity(weight_sparsity(current)),
            val,
            val - dense_val,
            "within limit" if within_limit else "over limit",
            test,
        )
        if within_limit:
            accepted = current
            accepted_round = round_number

    if accepted is None:
        raise RuntimeError(
            f"every pruning round lost more than {args.max_drop} points of validation accuracy. "
            "Try a smaller first target with --schedule or more --finetune-epochs"
        )
    log.info("keeping round %d, the sparsest round within the validation limit", accepted_round)

    pruned = accepted
    for name in PRUNED_LAYERS:
        prune.remove(getattr(pruned, name), "weight")
    sparsity = weight_sparsity(pruned)
    pruned_predictions = predict(pruned, x_test)
    pruned_test = accuracy_percent(pruned_predictions, y_test)
    if dense_test - pruned_test > args.max_drop:
        log.warning(
            "pruned test accuracy %.2f%% is more than %.2f points below the dense %.2f%%",
            pruned_test,
            args.max_drop,
            dense_test,
        )

    export_onnx(pruned, out_path)
    check_onnx_matches_torch(out_path, x_test_np, y_test, pruned_predictions)

    elapsed = time.perf_counter() - started
    print(f"dense test accuracy:  {dense_test:.2f}%")
    print(f"pruned test accuracy: {pruned_test:.2f}%")
    print(f"weight sparsity:      {format_sparsity(sparsity)}")
    print(f"pruned model:         {out_path} ({out_path.stat().st_size} bytes)")
    print(f"run time:             {elapsed:.1f} s with {args.threads} torch threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())

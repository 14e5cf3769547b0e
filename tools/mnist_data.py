"""MNIST loading and repository-relative paths, shared by the LeNet scripts (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = "../shared/datasets/mnist/mnist.npz"


def resolve_from_repo(path: str) -> Path:
    """Resolve a relative path against the repository root, not the current directory."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    return (REPO_ROOT / candidate).resolve()


def load_mnist(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST from an .npz file with keys x_train, y_train, x_test and y_test.

    Returns (x_train, y_train, x_test, y_test). Images are flattened to
    float32 [N, 784] and scaled to [0, 1]. Labels are int64.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file not found: {path}. Pass its location with --data.")

    with np.load(path) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise KeyError(f"{path} is missing the arrays {sorted(missing)}")
        arrays = [data[key] for key in ("x_train", "y_train", "x_test", "y_test")]

    x_train, y_train, x_test, y_test = arrays
    x_train = x_train.reshape(len(x_train), -1).astype(np.float32) / 255.0
    x_test = x_test.reshape(len(x_test), -1).astype(np.float32) / 255.0
    if x_train.shape[1] != 784 or x_test.shape[1] != 784:
        raise ValueError(f"expected 28x28 images in {path}, got {x_train.shape[1]} pixels per image")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)

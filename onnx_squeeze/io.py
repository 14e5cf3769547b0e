"""Loading and saving ONNX models.

Loading resolves external data relative to the model file's directory and turns every
failure into a ``ModelLoadError`` that names the file and the fix. Saving is atomic: the
model (and its external-data file, if any) is written under a temporary name in the target
directory and then renamed, so a failed run never leaves a partial file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .errors import ModelLoadError, OutputError

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more, so models of that size are checked
# and run from files instead of from in-memory bytes.
PROTOBUF_LIMIT_BYTES = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model and its external data, and run the ONNX checker on it."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found; check the path of the input model")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file; pass the path of an .onnx file")

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelLoadError(
            f"{path}: not a valid ONNX model ({exc}); the file may be truncated or of "
            "another format, so re-export or re-download it"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc})") from exc

    if not model.HasField("graph"):
        raise ModelLoadError(
            f"{path}: the file parsed but contains no ONNX graph; it may be truncated or not "
            "an ONNX model"
        )

    _load_external_data(model, path)
    check_model(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base_dir = path.parent
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        data_path = base_dir / info.location
        if not data_path.is_file():
            raise ModelLoadError(
                f"{path}: external data file '{info.location}' of tensor '{tensor.name}' not "
                f"found in {base_dir}; keep the data file next to the model"
            )
    try:
        onnx.load_external_data_for_model(model, str(base_dir))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: failed to read external data ({exc})") from exc


def check_model(model: onnx.ModelProto, path: Path | str) -> None:
    """Run ``onnx.checker`` and raise ``ModelLoadError`` naming ``path`` on failure."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
            onnx.checker.check_model(model)
        else:
            # The checker can only read models over 2 GiB from a file.
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp) / "model.onnx"
                _write_model(model, tmp_path, external_data=True)
                onnx.checker.check_model(str(tmp_path))
    except onnx.checker.ValidationError as exc:
        message = " ".join(str(exc).split())[:400] or repr(exc)
        raise ModelLoadError(f"{path}: rejected by onnx.checker: {message}; fix or re-export the model") from exc


def external_data_name(path: Path) -> str:
    """Return the file name used for the external data of a model saved at ``path``."""
    return path.name + ".data"


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    With ``external_data`` the tensors go to ``<name>.data`` beside the model. Models too big
    for one protobuf message are always written with external data.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{path}: {directory} is not a directory; choose another -o path")
    if not directory.is_dir():
        raise OutputError(f"{path}: output directory {directory} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; pass a file name such as model.min.onnx")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{path}: directory {directory} is not writable; choose another -o path")

    if not external_data and model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
        logger.warning("%s: model exceeds 2 GiB, writing its tensors as external data", path)
        external_data = True

    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".onnx_squeeze-", dir=directory))
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a temporary file in {directory} ({exc})") from exc

    try:
        tmp_model = tmp_dir / path.name
        _write_model(model, tmp_model, external_data=external_data, data_name=external_data_name(path))
        mode = 0o666 & ~_umask()
        for written_file in tmp_dir.iterdir():
            os.chmod(written_file, mode)
        written = []
        if external_data:
            # The data file goes first so that the model never points at a missing file.
            os.replace(tmp_dir / external_data_name(path), directory / external_data_name(path))
            written.append(directory / external_data_name(path))
        os.replace(tmp_model, path)
        written.append(path)
    except OSError as exc:
        raise OutputError(f"{path}: failed to write the model ({exc})") from exc
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()

    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _write_model(model: onnx.ModelProto, path: Path, *, external_data: bool, data_name: str | None = None) -> None:
    if not external_data:
        with open(path, "wb") as stream:
            stream.write(model.SerializeToString())
        return

    # onnx.save_model(save_as_external_data=True) refuses to run when a file of the data
    # file's name exists in the current directory, so the tensors are written here instead.
    data_name = data_name or external_data_name(path)
    model = _copy(model)
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.STRING or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            raw = numpy_helper.to_array(tensor).tobytes()
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            data.write(raw)
            offset += len(raw)
    with open(path, "wb") as stream:
        stream.write(model.SerializeToString())


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def external_data_locations(model: onnx.ModelProto) -> set[str]:
    """Return the external-data file names that ``model``'s tensors were read from."""
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return locations


def model_files_size(path: Path) -> int:
    """Return the bytes on disk of a model file plus the external-data files it references."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            locations.add(onnx.external_data_helper.ExternalDataInfo(tensor).location)
    for location in locations:
        data_path = path.parent / location
        if data_path.is_file():
            total += data_path.stat().st_size
    return total

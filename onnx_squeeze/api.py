"""The public entry points: ``minimize`` and ``minimize_file``.

``minimize`` runs the pipeline normalize -> (analyze -> rewrite) to a fixed point -> verify
on a copy of the model and returns the result; it never mutates its argument and writes
nothing. ``minimize_file`` adds loading, the rule that nothing is written unless the check
passed (or ``force`` is set), the atomic write, and the JSON report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .analysis import Refusal, analyze
from .errors import InputsError, OutputError, VerificationError
from .graph import GraphIndex
from .io import external_data_locations, external_data_name, load_model, model_files_size, save_model
from .normalize import normalize
from .report import PROVENANCE_KEY, build_report, provenance
from .stats import model_stats
from .rewrite import LayerChange, apply_plan
from .verify import DEFAULT_BATCH_SIZES, DEFAULT_SEED, Verification, check_user_inputs, verify

logger = logging.getLogger(__name__)

# The fixed point is normally reached in a few rounds; this bounds a bug, not a model.
MAX_ROUNDS = 1000


@dataclass
class LayerHistory:
    """A weight op's shape and the original indices of its units still present."""

    node: str
    weight: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    out_units: np.ndarray
    in_units: np.ndarray
    out_total: int
    in_total: int
    folded: bool = False

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "weight": self.weight,
            "shape_before": list(self.shape_before),
            "shape_after": list(self.shape_after),
            "removed_output_units": np.setdiff1d(np.arange(self.out_total), self.out_units).tolist(),
            "removed_input_units": np.setdiff1d(np.arange(self.in_total), self.in_units).tolist(),
            "folded_constants": self.folded,
        }


@dataclass
class MinimizeResult:
    """The minimized model with what was done to it."""

    model: onnx.ModelProto
    changed: bool
    rounds: int
    layers: list[LayerHistory]
    refusals: list[Refusal]
    verification: Verification | None
    report: dict = field(default_factory=dict)
    seconds: float = 0.0


def minimize(
    model: onnx.ModelProto,
    *,
    prune_inputs: bool = False,
    verify_outputs: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    inputs: dict[str, np.ndarray] | None = None,
    inputs_source: str = "inputs",
    seed: int = DEFAULT_SEED,
    dim_sizes: dict[str, int] | None = None,
) -> MinimizeResult:
    """Return a minimized copy of ``model``; see the module docstring."""
    started = time.perf_counter()
    normalized = normalize(model)
    current = normalized
    history: dict[str, LayerHistory] = {}
    refusals: list[Refusal] = []
    rounds = 0

    while True:
        plan = analyze(GraphIndex(current), prune_inputs=prune_inputs)
        refusals = plan.refusals
        if not plan.changed:
            break
        rounds += 1
        assert rounds <= MAX_ROUNDS, "minimization did not reach a fixed point"
        current, changes = apply_plan(plan)
        logger.info("round %d: removed %d units (channels or neurons) from %d weight tensors",
                    rounds, plan.removed_classes(), len(changes))
        for change in changes:
            _record(history, change)

    if rounds and _grew(model, current):
        # Copies of shared weights or Gather indices can outweigh what was removed.
        logger.warning("the minimized model would be larger than the input; returning the input unchanged")
        rounds, history = 0, {}
    if rounds == 0:
        # Nothing to remove: hand back the input itself rather than its normalized form.
        current = onnx.ModelProto()
        current.CopyFrom(model)
    elif not model.graph.value_info:
        # Keep the output no larger than the input when the input carried no shape info.
        del current.graph.value_info[:]

    for refusal in refusals:
        logger.info("kept %d units of %s: %s", refusal.units, ", ".join(refusal.tensors), refusal.reason)

    verification = None
    if verify_outputs:
        verification = verify(
            model, current, rtol=rtol, atol=atol, batch_sizes=batch_sizes,
            inputs=inputs, inputs_source=inputs_source, seed=seed, dim_sizes=dim_sizes,
        )

    result = MinimizeResult(
        model=current,
        changed=rounds > 0,
        rounds=rounds,
        layers=list(history.values()),
        refusals=refusals,
        verification=verification,
        seconds=time.perf_counter() - started,
    )
    result.report = build_report(model, normalized, result)
    _stamp_provenance(result)
    return result


def _grew(original: onnx.ModelProto, minimized: onnx.ModelProto) -> bool:
    """Return True if the minimized model has more parameters or more bytes than the input."""
    before, after = model_stats(original), model_stats(minimized)
    if after.params > before.params:
        return True
    return _graph_bytes(minimized) > _graph_bytes(original)


def _graph_bytes(model: onnx.ModelProto) -> int:
    # Tensor data only: names and shape information change by a few bytes either way.
    return sum(numpy_helper.to_array(tensor).nbytes for tensor in model.graph.initializer)


def _record(history: dict[str, LayerHistory], change: LayerChange) -> None:
    entry = history.get(change.node)
    out_axis_len, in_axis_len = change.out_units, change.in_units
    if entry is None:
        entry = LayerHistory(
            node=change.node,
            weight=change.weight,
            shape_before=change.shape_before,
            shape_after=change.shape_before,
            out_units=np.arange(out_axis_len),
            in_units=np.arange(in_axis_len),
            out_total=out_axis_len,
            in_total=in_axis_len,
        )
        history[change.node] = entry
    entry.out_units = np.delete(entry.out_units, change.removed_out)
    entry.in_units = np.delete(entry.in_units, change.removed_in)
    entry.shape_after = change.shape_after
    entry.folded = entry.folded or change.folded


def _stamp_provenance(result: MinimizeResult) -> None:
    record = provenance(result)
    props = result.model.metadata_props
    for prop in list(props):
        if prop.key == PROVENANCE_KEY:
            props.remove(prop)
    props.add(key=PROVENANCE_KEY, value=json.dumps(record, sort_keys=True, separators=(",", ":")))


def minimize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike | None,
    *,
    report_path: str | os.PathLike | None = None,
    external_data: bool = False,
    force: bool = False,
    inputs_path: str | os.PathLike | None = None,
    **options,
) -> MinimizeResult:
    """Load, minimize, verify and (when verified or forced) write; raises ``SqueezeError``.

    With ``output_path`` None nothing is written; this is what ``onnx-squeeze inspect`` does.
    """
    input_path = Path(input_path)
    output_path = Path(output_path) if output_path is not None else None
    report_path = Path(report_path) if report_path is not None else None
    model = load_model(input_path)
    _check_paths(input_path, output_path, report_path, external_data=external_data)

    if inputs_path is not None:
        options["inputs"] = load_inputs(inputs_path)
        options["inputs_source"] = str(inputs_path)
        check_user_inputs(model, options["inputs"], str(inputs_path))

    result = minimize(model, **options)
    result.report["input"] = str(input_path)
    result.report["bytes_before"] = model_files_size(input_path)

    failed = result.verification is not None and not result.verification.passed
    if output_path is not None and (not failed or force):
        if failed:
            logger.warning("writing %s although verification failed (--force)", output_path)
        save_model(result.model, output_path, external_data=external_data)
        result.report["output"] = str(output_path)
        result.report["bytes_after"] = model_files_size(output_path)
    if report_path is not None:
        _write_json(result.report, report_path)
    if failed:
        raise VerificationError(
            f"{input_path}: verification failed: {result.verification.message}; "
            + ("the model was written anyway (--force)" if force and output_path else "nothing was written")
        )
    return result


def _check_paths(input_path: Path, output_path: Path | None,
                 report_path: Path | None, *, external_data: bool) -> None:
    """Reject output and report paths that would overwrite an input file or each other."""
    protected = {input_path.resolve(): "the input model"}
    for location in external_data_locations(onnx.load(str(input_path), load_external_data=False)):
        protected[(input_path.parent / location).resolve()] = f"the input's external data file '{location}'"

    targets = []
    if output_path is not None:
        targets.append((output_path, "-o"))
        if external_data:
            targets.append((output_path.parent / external_data_name(output_path), "-o (its .data file)"))
    if report_path is not None:
        targets.append((report_path, "--report"))

    for path, option in targets:
        resolved = path.resolve()
        if resolved in protected:
            raise OutputError(f"{path}: the {option} path is {protected[resolved]}; choose another path so that it is kept")
        directory = path.parent
        if directory.exists() and not directory.is_dir():
            raise OutputError(f"{path}: {directory} is not a directory; choose another {option} path")
        if not directory.is_dir():
            raise OutputError(f"{path}: output directory {directory} does not exist; create it first")
        protected[resolved] = f"the {option} path"


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    hint = "write it with numpy.savez(path, **{input_name: array})"
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise InputsError(f"{path}: inputs file not found; pass an .npz file ({hint})") from exc
    except (OSError, ValueError) as exc:
        raise InputsError(f"{path}: not an .npz archive; {hint}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputsError(f"{path}: contains a single array, not an .npz archive of named arrays; {hint}")
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except ValueError as exc:
            raise InputsError(f"{path}: an array in the archive cannot be read ({exc}); {hint}") from exc


def _write_json(report: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: failed to write the report ({exc.strerror})") from exc


__all__ = ["MinimizeResult", "minimize", "minimize_file", "load_inputs", "__version__"]

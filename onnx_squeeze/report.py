"""The JSON report, the provenance record stored in the model, and the terminal table.

The report is the audit trail of a run: size figures before and after, the verification
result, one entry per weight tensor with its shapes and the removed unit indices (numbered as
in the input model), and the unit classes that were kept for a reason other than being live.
The provenance record is a short summary of it, stored in the output model's
``metadata_props`` under ``onnx_squeeze``.
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING

import onnx
from rich.table import Table

from .stats import layer_widths, model_stats

if TYPE_CHECKING:
    from .api import MinimizeResult

PROVENANCE_KEY = "onnx_squeeze"


def build_report(original: onnx.ModelProto, normalized: onnx.ModelProto, result: MinimizeResult) -> dict:
    from . import __version__

    before = model_stats(original)
    after = model_stats(result.model)
    report = {
        "tool": f"onnx_squeeze {__version__}",
        **before.as_dict("before"),
        **after.as_dict("after"),
        "changed": result.changed,
        "rounds": result.rounds,
        "seconds": round(result.seconds, 3),
    }
    if result.verification is not None:
        report.update(result.verification.as_dict())
    else:
        report.update({"verified": False, "max_abs_error": None, "max_rel_error": None,
                       "verification_message": "verification skipped (--no-verify)"})
    report["layers"] = [entry.as_dict() for entry in result.layers]
    report["widths_before"] = {k: list(v) for k, v in layer_widths(normalized).items()}
    report["widths_after"] = {k: list(v) for k, v in layer_widths(result.model).items()}
    report["kept_by_rule"] = [refusal.as_dict() for refusal in result.refusals]
    return report


def provenance(result: MinimizeResult) -> dict:
    from . import __version__

    report = result.report
    return {
        "tool": f"onnx_squeeze {__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "verified": report["verified"],
        "max_abs_error": report["max_abs_error"],
        "removed_units": {
            entry.node: {
                "output": len(entry.as_dict()["removed_output_units"]),
                "input": len(entry.as_dict()["removed_input_units"]),
            }
            for entry in result.layers
        },
    }


def _ratio(before: int, after: int) -> str:
    return f"{before / after:.2f}x" if after else "-"


def summary_table(report: dict) -> Table:
    """Build a before/after table of the figures in ``report``."""
    table = Table(title="onnx-squeeze", show_lines=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    for key, label in (("params", "dense parameters"), ("nonzero", "non-zeros"),
                       ("macs", "multiply-adds / sample"), ("bytes", "bytes")):
        before, after = report.get(f"{key}_before"), report.get(f"{key}_after")
        if before is None or after is None:
            table.add_row(label, f"{before:,}" if before is not None else "-", "-", "-")
            continue
        table.add_row(label, f"{before:,}", f"{after:,}", _ratio(before, after))

    widths_after = report.get("widths_after", {})
    for node, (inputs, outputs) in report.get("widths_before", {}).items():
        new_in, new_out = widths_after.get(node, (inputs, outputs))
        table.add_row(f"  {node} (in x out)", f"{inputs} x {outputs}", f"{new_in} x {new_out}", "")
    return table


def verification_line(report: dict) -> str:
    if report.get("max_abs_error") is None:
        return "verification: skipped"
    status = "passed" if report["verified"] else "FAILED"
    return (
        f"verification: {status}, max abs error {report['max_abs_error']:.3g}, "
        f"max rel error {report['max_rel_error']:.3g} on {len(report.get('verification_inputs', []))} input sets"
    )

"""The ``onnx-squeeze`` command.

Every ``SqueezeError`` becomes one line on stderr and the error's exit status (2 for bad
input, 3 for a failed verification); with ``-v`` the traceback is shown too.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler

from . import __version__
from .api import minimize_file
from .errors import SqueezeError
from .report import summary_table, verification_line
from .verify import DEFAULT_ATOL, DEFAULT_BATCH_SIZES, DEFAULT_RTOL, DEFAULT_SEED

logger = logging.getLogger(__name__)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def _parse_batches(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,3") from None
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter(f"'{value}' must list at least one size, each 1 or more")
    return sizes


def _parse_dims(_ctx, _param, values: tuple[str, ...]) -> dict[str, int]:
    sizes = {}
    for value in values:
        name, _, size = value.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise click.BadParameter(f"'{value}' is not NAME=SIZE with a positive SIZE, e.g. height=32")
        sizes[name] = int(size)
    return sizes


def _check_options(function):
    options = [
        click.option("--rtol", type=click.FloatRange(min=0), default=None,
                      help=f"Relative tolerance of the output comparison [default: {DEFAULT_RTOL}, "
                           "1e-2 for float16 outputs]."),
        click.option("--atol", type=click.FloatRange(min=0), default=None,
                      help=f"Absolute tolerance of the output comparison [default: {DEFAULT_ATOL}, "
                           "1e-3 for float16 outputs]."),
        click.option("--batch", "batch_sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                      show_default=True, callback=_parse_batches,
                      help="Comma-separated sizes given to every dynamic dim in the check."),
        click.option("--dim", "dim_sizes", multiple=True, callback=_parse_dims, metavar="NAME=SIZE",
                      help="Size of the symbolic dim NAME in the check (repeatable); other dynamic "
                           "dims take the --batch sizes."),
        click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path),
                      help="An .npz file of your own inputs for the check, one array per graph input name."),
        click.option("--seed", type=click.IntRange(min=0), default=DEFAULT_SEED, show_default=True,
                      help="Seed of the random check inputs."),
        click.option("--prune-inputs", is_flag=True,
                      help="Drop input features nothing reads, through a Gather after the graph input."),
        click.option("-v", "--verbose", count=True,
                      help="Log decisions and the reasons units were kept; -vv adds debug detail."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-squeeze")
def main() -> None:
    """Shrink element-wise-pruned ONNX models exactly: remove dead and unused units."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Path of the minimized model; never the input path.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report of the run to this file.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--force", is_flag=True,
              help="Write the model even if verification fails; the exit status is still non-zero.")
@click.option("--external-data", is_flag=True,
              help="Store the tensors in <output>.data beside the model.")
@_check_options
def minimize(model, output, report_path, no_verify, force, external_data, rtol, atol, batch_sizes,
             dim_sizes, inputs_path, seed, prune_inputs, verbose):
    """Write a smaller model that computes the same outputs as MODEL."""
    _setup_logging(verbose)
    _run(
        model, output, report_path=report_path, verbose=verbose, force=force,
        external_data=external_data, verify_outputs=not no_verify, rtol=rtol, atol=atol,
        batch_sizes=batch_sizes, dim_sizes=dim_sizes, inputs_path=inputs_path, seed=seed,
        prune_inputs=prune_inputs,
    )


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report of the run to this file.")
@_check_options
def inspect(model, report_path, rtol, atol, batch_sizes, dim_sizes, inputs_path, seed, prune_inputs, verbose):
    """Show what minimizing MODEL would remove; nothing is written but the report."""
    _setup_logging(verbose)
    _run(
        model, None, report_path=report_path, verbose=verbose, force=False, external_data=False,
        verify_outputs=True, rtol=rtol, atol=atol, batch_sizes=batch_sizes, dim_sizes=dim_sizes,
        inputs_path=inputs_path, seed=seed, prune_inputs=prune_inputs,
    )


def _run(model, output, *, report_path, verbose, **options) -> None:
    console = Console()
    try:
        result = minimize_file(model, output, report_path=report_path, **options)
    except SqueezeError as exc:
        if verbose:
            logger.exception("failed")
        click.echo(f"onnx-squeeze: error: {exc}", err=True)
        sys.exit(exc.exit_code)

    report = result.report
    console.print(summary_table(report))
    console.print(verification_line(report))
    for refusal in result.refusals:
        console.print(f"kept {_count(refusal.units, 'unit')} ({', '.join(refusal.tensors[:3])}"
                      f"{', ...' if len(refusal.tensors) > 3 else ''}): {refusal.reason}")
    console.print(f"time: {report['seconds']:.2f} s in {_count(report['rounds'], 'round')}")
    if output is not None:
        console.print(f"wrote {output}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


if __name__ == "__main__":
    main()

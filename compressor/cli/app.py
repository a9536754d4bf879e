"""The ``compressor`` command line (Typer). Each command is a thin layer over the Python API.

User errors (a bad recipe, a missing file, a damaged checkpoint) print a short message and exit
with code 1; they never show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from compressor import __version__

app = typer.Typer(
    name="compressor",
    help="Recipe-driven model compression for PyTorch, built around M-FAC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a recipe variable: --set name=value (repeatable)."
ALLOW_IMPORT_HELP = (
    "Let the recipe's train.model / train.data import and call a 'package.module:factory' from MODULE "
    "(or its submodules). Repeatable. A recipe imports nothing without it."
)
TRUST_HELP = "Let the recipe import and call any 'package.module:factory' it names (trust its code)."

AllowImportOption = Annotated[
    list[str] | None, typer.Option("--allow-import", metavar="MODULE", help=ALLOW_IMPORT_HELP)
]
TrustOption = Annotated[bool, typer.Option("--trust-recipe-code", help=TRUST_HELP)]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"compressor {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Recipe-driven model compression for PyTorch, built around M-FAC."""


def _fail(message: str) -> None:
    typer.echo(message.rstrip(), err=True)
    raise typer.Exit(code=1)


def _launch_rank() -> int:
    """This process's rank under torchrun (RANK), 0 otherwise."""
    import os

    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _fail_once(exc: BaseException) -> None:
    """``_fail`` on the rank that reports ``exc`` (the first that failed), a silent exit elsewhere."""
    if getattr(exc, "reported_by_rank", None) is not None:
        raise typer.Exit(code=1)
    rank = _launch_rank()
    _fail(f"[rank {rank}] {exc}" if rank else str(exc))


def _allowed(modules: list[str] | None, trust: bool) -> bool | tuple[str, ...]:
    """``allow_imports`` of the Python API from --allow-import and --trust-recipe-code."""
    return True if trust else tuple(modules or ())


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean 'the user asked for something wrong' (no traceback)."""
    from compressor.core.errors import CompressorError

    return (CompressorError, FileNotFoundError)


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (optional with --resume).")] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for checkpoint, metrics, plots.")
    ] = Path("out"),
    sets: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder.")] = None,
    allow_recipe_change: Annotated[
        bool, typer.Option("--allow-recipe-change", help="On --resume, accept a recipe that differs.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    allow_import: AllowImportOption = None,
    trust_recipe_code: TrustOption = False,
) -> None:
    """Train and compress as RECIPE says; writes checkpoint.pt, metrics.csv, summary.json and plots."""
    from compressor.engine import run as run_recipe
    from compressor.recipe import parse_sets

    try:
        summary = run_recipe(
            recipe,
            resume if resume is not None else output,
            overrides=parse_sets(sets),
            resume=resume is not None,
            allow_recipe_change=allow_recipe_change,
            progress=progress and sys.stdout.isatty(),
            allow_imports=_allowed(allow_import, trust_recipe_code),
        )
    except _user_errors() as exc:
        _fail_once(exc)
    if _launch_rank() != 0:
        return
    folder = resume if resume is not None else output
    typer.echo(
        f"done: {_metrics_line(summary['eval'], summary.get('dense_eval'))}, global sparsity "
        f"{summary['sparsity']['global']:.1%}, {summary['wall_time_s']:.1f} s -> {folder}"
    )


def _metrics_line(final: dict[str, float], dense: dict[str, float] | None) -> str:
    """``accuracy 97.9%`` or ``recall@1 0.5123 (dense 0.5654), mrr@10 ...``: the task's metrics,
    the loss only when there are none, each beside its dense value when the run has one."""
    names = [n for n in final if n != "loss"] or ["loss"]
    parts = []
    for name in names:
        shown = f"{final[name]:.2%}" if name == "accuracy" else f"{final[name]:.4g}"
        if dense and name in dense and name != "accuracy":
            shown += f" (dense {dense[name]:.4g})"
        parts.append(f"{name} {shown}")
    return ", ".join(parts)


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    sets: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
) -> None:
    """Check RECIPE; print FILE:LINE:COL errors and exit 1, or exit 0 and list what it would import."""
    from compressor.recipe.loader import validate_command

    raise typer.Exit(code=validate_command(recipe, sets or []))


@app.command()
def inspect(
    path: Annotated[
        Path, typer.Argument(help="A recipe (.yaml), a checkpoint (.pt) or an ONNX model (.onnx).")
    ],
    epochs: Annotated[
        float | None, typer.Option(help="Epochs to tabulate for a recipe without train.")
    ] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(min=1, help="Optimizer steps per epoch, to place a recipe's {step: N} positions."),
    ] = None,
) -> None:
    """A recipe's schedule table, or the sparsity per tensor of a checkpoint or ONNX file."""
    from rich.console import Console

    from compressor.cli import inspection

    try:
        table = inspection.inspect_path(path, epochs=epochs, steps_per_epoch=steps_per_epoch)
    except _user_errors() as exc:
        _fail(str(exc))
    Console().print(table)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt written by `compressor run`.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="ONNX file (default: CHECKPOINT with .onnx).")
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: exporter's).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="'dynamic' or a fixed batch size N.")] = "dynamic",
    compress: Annotated[
        bool, typer.Option("--compress", help="Store sparse tensors as sparse initializers (verified too).")
    ] = False,
    atol: Annotated[float, typer.Option("--atol", help="Max |onnxruntime - PyTorch| allowed.")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="Max |diff| / max |PyTorch output| allowed.")] = 1e-3,
    exporter: Annotated[str, typer.Option("--exporter", help="legacy (TorchScript) or dynamo.")] = "legacy",
    allow_import: AllowImportOption = None,
    trust_recipe_code: TrustOption = False,
) -> None:
    """Export CHECKPOINT to ONNX, verified against onnxruntime; writes export_report.json beside it."""
    from rich.console import Console

    from compressor.core import registry

    try:
        export_fn = registry.get("exporters", "onnx")
    except registry.RegistryError as exc:
        _fail(f"{exc}; reinstall the package (pip install -e .) to register its exporters")
    # A third-party exporter may name its own user errors; ours are CompressorErrors.
    errors = _user_errors() + tuple(getattr(export_fn, "user_errors", ()))
    allowed = _allowed(allow_import, trust_recipe_code)
    # Only when given, so that an exporter without the keyword keeps working for recipes without imports.
    opt_in = {"allow_imports": allowed} if allowed else {}
    try:
        report = export_fn(
            checkpoint,
            output,
            opset=opset,
            batch=batch,
            compress=compress,
            atol=atol,
            rtol=rtol,
            exporter=exporter,
            **opt_in,
        )
    except errors as exc:
        failed = getattr(exc, "report", None)
        if failed is not None:
            Console(stderr=True).print(failed)
        _fail(str(exc))
    Console().print(report)

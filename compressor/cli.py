"""The ``compressor`` command line (Typer). Each command is a thin layer over the Python API."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    name="compressor",
    help="Recipe-driven model compression for PyTorch, built around M-FAC.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"compressor {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Recipe-driven model compression for PyTorch, built around M-FAC."""


@app.command()
def info() -> None:
    """Print the versions of compressor and torch, and where the M-FAC math will run."""
    import torch

    typer.echo(f"compressor {__version__}")
    typer.echo(f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads)")
    typer.echo(f"CUDA available: {torch.cuda.is_available()}")


if __name__ == "__main__":
    app()

"""``python -m compressor.cli``: the ``compressor`` command line (what torchrun launches per rank)."""

from compressor.cli.app import app

app()

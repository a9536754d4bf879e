"""The ``compressor`` command line (Typer): ``run``, ``validate``, ``export``, ``inspect``.

``app`` is the Typer application (the ``compressor`` script); ``python -m compressor.cli`` runs it too
(torchrun launches it that way).
"""

from compressor.cli.app import app

__all__ = ["app"]

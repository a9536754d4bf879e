"""The exporters' errors: both are user-facing (the CLI prints the message, no traceback)."""

from __future__ import annotations

from typing import Any

from compressor.core.errors import CompressorError


class ExportError(CompressorError, ValueError):
    """The export cannot be done as asked (bad option, output over the input, model not rebuildable)."""


class VerificationError(ExportError):
    """The exported model failed a check; the message lists each failure with its numbers.

    ``report`` is the ExportReport of the failed export (also written as export_report.json).
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report

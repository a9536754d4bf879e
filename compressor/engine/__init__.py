"""``compressor run``: a recipe's train section wired to data, model, task and session, run on a
device, with checkpoints every epoch, evaluation, metrics, plots and a summary.

``run`` is the entry point; ``evaluate`` scores a model on a split with a task.
"""

from compressor.engine.device import resolve_device
from compressor.engine.evaluation import evaluate
from compressor.engine.files import RunError, RunFiles
from compressor.engine.run import run

__all__ = ["RunError", "RunFiles", "evaluate", "resolve_device", "run"]

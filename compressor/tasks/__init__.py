"""Tasks: what a batch is and how a model is scored (``compressor.tasks.base`` has the contract).

Built-ins by recipe name (``build_task``): ``classification``, ``model-loss`` and ``contrastive``
(sentence pairs, in-batch negatives, retrieval metrics from ``compressor.tasks.retrieval``).
"""

from compressor.tasks.base import (
    LOSSES,
    ClassificationTask,
    ModelLossTask,
    Task,
    TaskError,
    as_task,
    describe_batch,
    first_tensor,
    move_to,
    unpack_data,
)
from compressor.tasks.builtin import BUILTIN, build_task, loss_by_name

__all__ = [
    "BUILTIN",
    "LOSSES",
    "ClassificationTask",
    "ModelLossTask",
    "Task",
    "TaskError",
    "as_task",
    "build_task",
    "describe_batch",
    "first_tensor",
    "loss_by_name",
    "move_to",
    "unpack_data",
]

"""GLUE data for lorafit: the task registry, loading and the vendored GLUE copies."""

from lorafit.data.sources import GLUE_FILES, VENDORED_TASKS, Split, load_custom, load_split, read_label_values
from lorafit.data.tasks import TASKS, TaskSpec, custom_task, get_task

__all__ = [
    "GLUE_FILES",
    "TASKS",
    "VENDORED_TASKS",
    "Split",
    "TaskSpec",
    "custom_task",
    "get_task",
    "load_custom",
    "load_split",
    "read_label_values",
]

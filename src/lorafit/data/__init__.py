"""GLUE data for lorafit: the task registry, loading, tokenization, batching and statistics.

Modules: ``tasks`` (the registry), ``parsing`` (text to a Split), ``glue`` (GLUE files, vendored
copies, the hub), ``custom`` (user files and their task), ``tokenization``, ``batching``, ``stats``.

Typical use::

    task = get_task("SST-2")
    train = load_split(task, "train")                # vendored, --data-dir, or the hub
    encoded = encode_split(train, tokenizer, 128)    # cached on disk
    for indices in batch_order(len(encoded), 32, seed, epoch, encoded.lengths, group_by_length=True):
        batch = collate(encoded, indices, tokenizer.pad_token_id)
"""

from lorafit.data.batching import batch_order, collate, eval_batches, eval_order, iterate_batches
from lorafit.data.custom import custom_task, load_custom, read_label_values, read_table
from lorafit.data.glue import GLUE_FILES, VENDORED_TASKS, load_split
from lorafit.data.parsing import Split
from lorafit.data.stats import format_stats, split_stats
from lorafit.data.tasks import TASKS, TaskSpec, get_task
from lorafit.data.tokenization import (
    CACHE_FORMAT_VERSION,
    USE_DEFAULT_CACHE,
    Encoded,
    cache_key,
    default_cache_dir,
    encode_split,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "GLUE_FILES",
    "TASKS",
    "USE_DEFAULT_CACHE",
    "VENDORED_TASKS",
    "Encoded",
    "Split",
    "TaskSpec",
    "batch_order",
    "cache_key",
    "collate",
    "custom_task",
    "default_cache_dir",
    "encode_split",
    "eval_batches",
    "eval_order",
    "format_stats",
    "get_task",
    "iterate_batches",
    "load_custom",
    "load_split",
    "read_label_values",
    "read_table",
    "split_stats",
]

"""Training on several processes through Accelerate (torch.distributed underneath).

``torchrun --nproc_per_node N -m lorafit.cli train ...`` or ``accelerate launch ... -m lorafit.cli
train ...`` start N copies of the same command; this module makes them one training run:

* the global batch is ``batch_size x processes x grad_accum``: every process cuts the same
  global batches (``batch_order`` at ``batch_size x processes``) and takes its slice of each, so
  N processes at batch B/N see exactly the examples of one process at batch B, step for step;
* each slice's loss is weighted by its share of the global batch, so that DDP's average of the
  processes' gradients is the gradient of the global batch's mean loss (also for a short last batch);
* evaluation is split by batch across processes and the logits gathered back (see
  :func:`predict_logits_sharded` for why);
* only the main process writes files; the caller guards that with :func:`is_main_process`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit.data import Encoded, collate, eval_order
from lorafit.errors import LorafitError


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes files and prints results (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def refuse_launched(command: str, hint: str) -> None:
    """Raise a clear error when ``command`` (which runs as one process) was started by a launcher."""
    if launched_world_size() > 1:
        raise LorafitError(f"{command} runs as one process but was launched as {launched_world_size()}; {hint}")


def make_accelerator(mixed_precision: str, device: torch.device | None = None, **kwargs: Any) -> Any:
    """An Accelerator joined to the process group the launcher set up (``kwargs``: more of
    ``Accelerator``'s arguments, such as the trackers of ``--report-to``).

    Without a GPU, Accelerate only builds a CPU process group when told to use the CPU
    (``cpu=True`` or ``ACCELERATE_USE_CPU``): under torchrun it otherwise sees ``LOCAL_RANK`` but no
    accelerator device, settles on ``DistributedType.NO``, and every process trains alone. So a
    launched run without CUDA asks for the CPU, which gives ``MULTI_CPU`` over gloo.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    world = launched_world_size()
    if world == 1:
        # One process may train several runs (the Python API, --seeds, tests) with different
        # --precision; Accelerate's state is a process-wide singleton that refuses a new one.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # split_batches: lorafit cuts each global batch into the processes' slices itself. Accelerate's
    # default assumes every process draws a whole batch, and steps the LR scheduler once per
    # process at each optimizer step, which would run the schedule N times too fast.
    # ``device`` is the run's resolved --device: a CPU run on a machine with a GPU stays on the CPU.
    cpu = device.type == "cpu" if device is not None else world > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True), **kwargs)
    if accelerator.num_processes != world:
        raise LorafitError(
            f"launched as {world} processes, but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); check the launcher's settings"
        )
    return accelerator


def check_supported(accelerator: Any, grad_accum: int) -> None:
    """Refuse what lorafit's loop cannot yet do under the launched strategy."""
    if accelerator.distributed_type.value == "DEEPSPEED" and grad_accum != 1:
        # DeepSpeed's engine scales and steps by its own gradient_accumulation_steps.
        raise LorafitError("--grad-accum must be 1 under DeepSpeed (raise --batch-size or the process count)")


def describe(accelerator: Any, batch_size: int, grad_accum: int) -> str:
    """One line on how the run is spread: processes, backend and the global batch."""
    n = accelerator.num_processes
    where = f"{n} processes ({accelerator.distributed_type.value}, {_backend()})" if n > 1 else "1 process"
    return (f"{where} on {accelerator.device.type}: global batch {batch_size * n * grad_accum} = "
            f"{batch_size} per process x {n} process{'es' if n > 1 else ''} x {grad_accum} accumulated")


def _backend() -> str:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


# -- training batches -------------------------------------------------------------------------


def global_batches(order: list[np.ndarray], num_processes: int) -> list[np.ndarray]:
    """The epoch's global batches that every process can take a non-empty slice of.

    A trailing batch with fewer examples than processes is dropped (a process with nothing to do
    would still have to join the gradient all-reduce); with one process nothing is dropped.
    """
    return [b for b in order if len(b) >= num_processes]


def local_slice(batch: np.ndarray, num_processes: int, index: int) -> tuple[np.ndarray, float]:
    """This process's contiguous slice of a global batch, and the weight of its mean loss.

    DDP averages the N processes' gradients. Weighting each slice's mean loss by
    ``N x slice size / batch size`` makes that average the gradient of the global batch's mean
    loss, even when the slices differ in size. With one process the weight is exactly 1.0.
    """
    part = np.array_split(batch, num_processes)[index]
    return part, len(part) * num_processes / len(batch)


# -- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits_sharded(model: nn.Module, data: Encoded, batch_size: int, pad_id: int, autocast: Any,
                           accelerator: Any) -> np.ndarray:
    """Model outputs for every example of ``data``, in file order, computed by all processes together.

    Why split rather than let every process evaluate everything: under FSDP and ZeRO-3 the
    weights are sharded, so every forward pass is a collective that all processes must join; and
    MNLI's dev sets (20k examples) are worth sharing out. The batches are those of one process
    (``eval_order``), dealt round-robin, so each example's logits are computed in the same padded
    batch as in a single-process run. Processes short of a batch repeat the last one, so all run
    the same number of forward passes; its logits land on the same rows twice with the same
    values, so nothing is counted twice and nothing is dropped.
    """
    wrapped = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    # DDP's forward broadcasts buffers (a collective) and adds nothing at eval: use the bare model.
    net = model if wrapped else accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    n, rank = accelerator.num_processes, accelerator.process_index
    batches = eval_order(data.lengths, batch_size)
    mine = batches[rank::n]
    mine += [batches[-1]] * (-(-len(batches) // n) - len(mine))
    results = []
    for indices in mine:
        batch = collate(data, indices, pad_id)
        batch.pop("labels")
        with autocast():
            logits = net(**{k: v.to(accelerator.device) for k, v in batch.items()}).logits
        results.append((indices, logits.float().cpu().numpy()))
    net.train(was_training)
    from accelerate.utils import gather_object

    gathered = gather_object(results)
    width = gathered[0][1].shape[-1] if gathered else 1
    out = np.full((len(data), width), np.nan, dtype=np.float32)
    for indices, logits in gathered:
        out[indices] = logits
    if np.isnan(out).any():  # a bug, not bad input: every row must have been filled
        raise RuntimeError("sharded evaluation left examples without predictions")
    return out


# -- sharded weights (FSDP, DeepSpeed ZeRO-3) -------------------------------------------------


def sharded(accelerator: Any) -> bool:
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")


def fill_fsdp_wrap_policy(accelerator: Any, model: nn.Module) -> None:
    """Wrap each encoder layer in its own FSDP unit unless the config names the classes.

    The shipped fsdp.yaml leaves the class out, so one file serves BERT, RoBERTa and DeBERTa-v2
    (Transformers does not list them in ``_no_split_modules``, Accelerate's fallback).
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.transformer_cls_names_to_wrap:
        return
    layers = [m for name, m in model.named_modules() if name.endswith("encoder.layer.0")]
    if not layers:
        raise LorafitError("FSDP: no encoder.layer.0 in this model to wrap by; set "
                           "fsdp_transformer_layer_cls_to_wrap in the Accelerate config")
    plugin.transformer_cls_names_to_wrap = [type(layers[0]).__name__]


@contextlib.contextmanager
def full_weights(accelerator: Any, model: nn.Module) -> Iterator[None]:
    """While open, the unwrapped model holds whole weights on the main process (a collective).

    Under FSDP and ZeRO-3 each process keeps a shard of every weight; the adapter and checkpoint
    are written from the main process, so the shards are gathered first. A no-op otherwise.
    """
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                         offload_to_cpu=True):
            yield
    elif kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


# -- checkpoints ------------------------------------------------------------------------------


def process_rng_states(accelerator: Any) -> list[torch.Tensor]:
    """Every process's CPU RNG state (a collective: all processes call it), in rank order."""
    from accelerate.utils import gather_object

    return gather_object([torch.get_rng_state()])


def check_resumable(accelerator: Any, saved_processes: int) -> None:
    """Refuse to resume on a different number of processes (the global batch would change)."""
    if saved_processes != accelerator.num_processes:
        raise LorafitError(
            f"--resume: the checkpoint was written by a run on {saved_processes} process(es), this one has "
            f"{accelerator.num_processes}; resume with the same launch command"
        )
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise LorafitError(f"--resume is not supported under {accelerator.distributed_type.value} yet "
                           "(its optimizer state is sharded); resume under DDP or on one process")

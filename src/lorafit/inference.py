"""Using a trained model: load it, evaluate it, and export it merged (predict: :mod:`lorafit.predict`).

A trained model is given as a run directory (``config.yaml``), an adapter directory
(``adapter_config.json``, lorafit's or PEFT's) or a merged/full model folder (``config.json``).
LoRA layers are merged before inference, so it runs at the base model's speed. It computes in the
precision it trained in unless told otherwise (:func:`inference_precision`), so that ``lorafit
eval`` of a bf16 run gives the dev metric its training reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorafit.config import TrainConfig
from lorafit.data import TaskSpec, encode_split, get_task, load_custom, load_split
from lorafit.errors import LorafitError, LorafitWarning
from lorafit.evaluation import predict_logits
from lorafit.fastpath import (
    native_bf16,
    resolve_device,
    resolve_frozen_bf16,
    resolve_precision,
    warn_if_slow_bf16,
)
from lorafit.flags import INFERENCE_PRECISIONS
from lorafit.io import atomic_dir, atomic_write_json, read_json, read_yaml_mapping
from lorafit.lora import load_adapter, merge_and_unload, pack_lora, read_adapter_config, read_adapter_metadata
from lorafit.lora.adapter import read_adapter_weights
from lorafit.models import load_model, load_tokenizer
from lorafit.paths import check_output
from lorafit.run import RunDir

TASK_FILE = "lorafit_task.json"  # written beside an exported merged model


@dataclass
class Trained:
    model: nn.Module
    tokenizer: Any
    task: TaskSpec | None
    max_length: int
    config: TrainConfig | None = None  # when loaded from a run directory
    precision: str = "fp32"  # what inference computes in: fp32, bf16 or fp16 (run the model under autocast())
    trained_in: str | None = None  # the precision recorded with the model, if any
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context inference runs in: bf16 (or, on a GPU, fp16) autocast, or nothing for fp32."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def inference_precision(requested: str, trained_in: str | None, device: torch.device | None = None) -> str:
    """The precision inference computes in on ``device`` (the CPU by default): ``fp32``, ``bf16`` or ``fp16``.

    Args:
        requested: ``trained`` (what the model trained in: a run's config.yaml, or the metadata
            lorafit writes beside an adapter or a merged model; fp32 where neither says), ``auto``
            (bf16 where the hardware multiplies bf16 natively, as ``lorafit train`` picks), ``fp32`` or
            ``bf16``.
        trained_in: The precision recorded with the model, if any.
        device: Where the model runs.

    A model trained in fp16, which needs a GPU, infers in fp16 on a GPU and in fp32 on the CPU.
    One trained in bf16 infers in fp32 where the hardware only emulates bf16 (a CPU without AMX or
    AVX-512 BF16 evaluated 3x slower in bf16 than in fp32), with a :class:`LorafitWarning`:
    its metric may then differ from the one its training reported in the last digits.
    In bf16 the linears are held as training held or autocast cast them (:func:`cast_linears_bf16`),
    so an unmerged run directory evaluated with its own eval batch size repeats its training's dev
    logits bit for bit.
    """
    if requested not in INFERENCE_PRECISIONS:
        raise LorafitError(f"--precision: expected one of {', '.join(INFERENCE_PRECISIONS)}, got {requested!r}")
    device = device or torch.device("cpu")
    if requested == "trained":
        if trained_in == "fp16" and device.type == "cuda":
            return "fp16"
        if trained_in == "bf16" and not native_bf16(device):
            warnings.warn("the model trained in bf16, which this device only emulates (many times slower than "
                          "fp32), so it runs in fp32: metrics may differ from its training's in the last digits "
                          "(--precision bf16 runs it in bf16 anyway)", LorafitWarning, stacklevel=2)
            return "fp32"
        return "bf16" if trained_in == "bf16" else "fp32"
    precision = resolve_precision(requested, device)
    warn_if_slow_bf16(precision, device, f"--precision {requested}")
    return precision


def _task_from_metadata(meta: dict[str, Any]) -> TaskSpec | None:
    spec = meta.get("task_spec")
    if spec:  # lists in JSON, tuples in TaskSpec
        return TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    return get_task(meta["task"]) if meta.get("task") else None


def _head_size(adapter: Path) -> int:
    """The label count of an adapter that does not record it (PEFT's), from its saved head.

    The head's output layer is its one weight that is not square (BERT's ``classifier``,
    RoBERTa's ``classifier.out_proj``; dense layers and poolers are hidden x hidden).
    """
    heads = read_adapter_config(adapter).modules_to_save or []
    sizes = {tensor.shape[0] for key, tensor in read_adapter_weights(adapter).items()
             if tensor.ndim == 2 and tensor.shape[0] != tensor.shape[1] and ".lora_" not in key
             and any(f".{h}." in f".{key}" for h in heads)}
    if len(sizes) != 1:
        raise LorafitError(f"{adapter}: no label count recorded and none readable from the saved head "
                           f"(modules_to_save: {heads}); the adapter needs a trained classification head")
    return int(sizes.pop())


def _load_lora(base: str, adapter: Path, meta: dict[str, Any], trust_remote_code: bool) -> tuple[nn.Module, Any]:
    labels = meta.get("label_names")
    num_labels = meta.get("num_labels") or (len(labels) if labels else None) or _head_size(adapter)
    model, _ = load_model(base, num_labels, labels, trust_remote_code)
    load_adapter(model, adapter)
    return model, load_tokenizer(base, trust_remote_code)


def load_trained(path: str | Path, trust_remote_code: bool = False, merge: bool = True,
                 precision: str = "fp32", device: str = "cpu") -> Trained:
    """Load whatever ``path`` holds, ready for inference (eval mode).

    With ``merge`` the LoRA layers are merged and unloaded: the model is a plain Transformers
    model again and runs at the base model's speed. Without it the LoRA branch stays separate,
    and the adapted projections of each attention block are packed (:func:`pack_lora`).
    ``precision`` is resolved by :func:`inference_precision` into ``Trained.precision``; in bf16
    the linear layers are stored in bf16 (:func:`cast_linears_bf16`), so the model must run under
    ``trained.autocast()``. The commands pass ``trained``; a caller of this function gets fp32
    unless it asks. ``device`` is ``cpu``, ``cuda`` or ``auto`` (a GPU when there is one), as
    ``lorafit train --device`` takes it; the commands pass ``auto``, a caller gets the CPU.
    """
    path = Path(path)
    where = resolve_device(device)
    if not path.exists():
        raise LorafitError(f"{path}: not found (expected a run, adapter or model directory)")
    if RunDir(path).is_run_dir():
        cfg = RunDir(path).train_config()
        if cfg.method == "lora":
            if not (path / "adapter" / "adapter_config.json").exists():
                raise LorafitError(f"{path}: the run has no adapter yet (adapter/ is missing); has it evaluated once?")
            meta = read_adapter_metadata(path / "adapter")
            model, tokenizer = _load_lora(cfg.model, path / "adapter", meta, cfg.trust_remote_code)
            task = _task_from_metadata(meta)
        else:
            if not (path / "model" / "config.json").exists():
                raise LorafitError(f"{path}: the run has no saved model yet (model/ is missing)")
            model, tokenizer, _ = _load_plain(path / "model", trust_remote_code)
            task = cfg.task_spec()
        trained = Trained(model, tokenizer, task, cfg.max_length, cfg, trained_in=cfg.precision)
    elif (path / "adapter_config.json").exists():
        read_adapter_config(path)  # validates the file before any model is loaded
        meta = read_adapter_metadata(path)
        base = meta.get("model_arg") or read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise LorafitError(f"{path}: adapter names no base model")
        model, tokenizer = _load_lora(base, path, meta, trust_remote_code)
        trained = Trained(model, tokenizer, _task_from_metadata(meta), meta.get("max_length", 512),
                          trained_in=meta.get("precision"))
    elif (path / "config.json").exists():
        model, tokenizer, meta = _load_plain(path, trust_remote_code)
        trained = Trained(model, tokenizer, _task_from_metadata(meta), meta.get("max_length", 512),
                          trained_in=meta.get("precision"))
    else:
        raise LorafitError(f"{path}: not a run directory (config.yaml), adapter (adapter_config.json) or model (config.json)")
    trained.device = where
    trained.precision = inference_precision(precision, trained.trained_in, where)
    if merge:
        trained.model = merge_and_unload(trained.model)
    trained.model.eval()
    if trained.precision == "bf16":
        # DoRA's base weight as the run held it (lorafit's adapters without a run: the default, bf16).
        cfg = trained.config
        cast_linears_bf16(trained.model, dora_base=cfg is None or resolve_frozen_bf16(cfg.frozen_bf16, cfg.precision, cfg.method))
    trained.model.to(where)
    if not merge:  # where the layers' dtype allows (bf16 here): the same bits, fewer operators
        pack_lora(trained.model)
    return trained


def cast_linears_bf16(model: nn.Module, dora_base: bool = True) -> int:
    """Store the linear layers that bf16 autocast would cast at every call in bf16 once; returns how many.

    Autocast casts an fp32 weight to bf16 each time it is used (it caches casts only in
    training), which on the CPU cost more than the products at batch 1: 7.40 against 6.14 ms in
    fp32 for the embedded model (docs/performance.md). The cast is the same rounding either way,
    so the outputs do not change. That holds for LoRA's factors too: the branch casts its input to
    the factors' dtype, which autocast would have cast to bf16 anyway. A DoRA layer is the
    exception: it also computes outside autocast (its norm, its rescaled base term) in the dtype
    of its input and base weight, so its factors stay fp32, and its base weight stays as training
    held it: ``dora_base`` says whether that was bf16 (``frozen_bf16``, the default for bf16 LoRA).
    """
    from lorafit.lora import LoRALinear

    dora = [layer for layer in model.modules() if isinstance(layer, LoRALinear) and layer.lora_magnitude_vector is not None]
    keep = {id(m) for layer in dora for m in (layer.lora_A, layer.lora_B, *(() if dora_base else (layer.base_layer,)))}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in keep]
    for module in linears:
        module.to(torch.bfloat16)
    return len(linears)


def _load_plain(path: Path, trust_remote_code: bool) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A plain Transformers model folder, its tokenizer, and the task lorafit recorded beside it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as e:
        raise LorafitError(f"{path}: could not load the model ({e})") from None
    return model, tokenizer, read_json(path / TASK_FILE) if (path / TASK_FILE).exists() else {}


def evaluate_trained(path: str | Path, task: str | None = None, data_dir: str | None = None, merged: bool = True,
                     batch_size: int | None = None, max_eval_samples: int | None = None,
                     precision: str = "trained", device: str = "cpu") -> dict[str, float]:
    """The dev metrics of a trained model; ``batch_size`` defaults to a run's own eval batch size
    (the batches' widths change the bits of bf16 products), else 64."""
    from lorafit.metrics import compute_metrics

    trained = load_trained(path, merge=merged, precision=precision, device=device)
    spec = get_task(task) if task else trained.task
    if spec is None:
        raise LorafitError(f"{path}: no task recorded; pass --task")
    if trained.task is not None and spec.num_labels != trained.task.num_labels:
        raise LorafitError(f"--task {spec.name}: has {spec.num_labels} labels, the model was trained with "
                           f"{trained.task.num_labels}")
    cfg = trained.config
    batch_size = batch_size or (cfg.eval_batch_size if cfg is not None else 64)
    outputs = {}
    for split in spec.eval_splits:
        if cfg is not None and cfg.validation_file and not task:
            raw = load_custom(cfg.validation_file, cfg.text_columns or ["text"], cfg.label_column, spec, split="validation")
        else:
            raw = load_split(spec, split, data_dir or (cfg.data_dir if cfg else None))
        data = encode_split(raw, trained.tokenizer, trained.max_length)
        if max_eval_samples:
            data = data.select(np.arange(min(max_eval_samples, len(data))))
        pad = trained.tokenizer.pad_token_id or 0
        outputs[split] = (predict_logits(trained.model, data, batch_size, pad, trained.autocast), data.labels)
    return compute_metrics(spec, outputs)


def export_merged(path: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Merge the LoRA layers into the base weights and save a plain Transformers model."""
    output = Path(output)
    check_output("--output", output, [("PATH", path), *_model_sources(Path(path))])
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise LorafitError(f"--output {output}: exists and is not empty; pass --overwrite to replace it")
    trained = load_trained(path)
    task = trained.task
    # Built beside the output and swapped in whole: a failed write keeps the old output.
    with atomic_dir(output) as tmp:
        trained.model.save_pretrained(tmp)
        trained.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TASK_FILE, {
            "task": task.name if task else None,
            "task_spec": dataclasses.asdict(task) if task else None,
            "max_length": trained.max_length,
            "precision": trained.trained_in,  # what inference from it computes in by default
        })
        from lorafit.card import facts_for_export, write_card

        write_card(tmp, facts_for_export(path, trained, output), "transformers", output)
    return output


def _model_sources(path: Path) -> list[tuple[str, str]]:
    """Local base-model folders a merge reads besides ``path`` (named in the run or the adapter)."""
    names = []
    if (path / "config.yaml").is_file():
        with contextlib.suppress(LorafitError):
            names.append(str(read_yaml_mapping(path / "config.yaml", "run config").get("model", "")))
    if (path / "adapter_config.json").is_file():
        with contextlib.suppress(LorafitError, AttributeError):
            names.append(str(read_json(path / "adapter_config.json").get("base_model_name_or_path") or ""))
    return [("model", n) for n in names if n and Path(n).expanduser().is_dir()]

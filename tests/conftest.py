"""Fixtures shared by the whole suite: the embedded tokenizer, tiny model and run settings, a tiny
random BERT saved as a model folder, and a way to interrupt training between checkpoints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# A 2-layer, hidden-32 encoder: the real module layout of its architecture, milliseconds a forward pass.
TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "vocab_size": 99}
# A training run on the embedded model that takes seconds: 48 RTE examples, batches of 8, 64 tokens.
TINY_RUN = {"task": "rte", "max_train_samples": 48, "max_eval_samples": 24, "batch_size": 8, "eval_batch_size": 32,
                "max_length": 64, "progress": False, "num_threads": 2}
# Sweep cells that take about a second each: 16 MRPC examples in batches of 8 (2 steps an epoch), 3 steps.
TINY_CELL = {"max_steps": 3, "max_train_samples": 16, "batch_size": 8, "max_eval_samples": 16, "max_length": 32,
             "num_threads": 1, "progress": False}
# Two steps of STS-B on the embedded model, for inference tests: a regression metric (Pearson) moves
# with any change in the logits' bits, where accuracy over a few examples would not.
STSB_RUN = {"task": "stsb", "max_train_samples": 32, "max_eval_samples": 16, "batch_size": 8, "eval_batch_size": 16,
            "max_length": 48, "progress": False, "num_threads": 1, "max_steps": 2, "eval_steps": 2}


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (sentence-transformers/all-MiniLM-L6-v2), loaded once."""
    from lorafit.models import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer, hidden-32 random BERT with the embedded model's tokenizer, saved like a Hub
    model: ``--model DIR`` trains and predicts with it in milliseconds per batch."""
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(**{**TINY_MODEL, "vocab_size": tokenizer.vocab_size}, max_position_embeddings=128)
    # The encoder alone, like a pretrained checkpoint: every task gets a fresh head of its size.
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine, thread hand-offs cost more than tiny models' math."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model_config() -> dict[str, Any]:
    """Config fields of a tiny encoder (a fresh copy: tests may change it)."""
    return dict(TINY_MODEL)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Callable[..., Any]:
    """``tiny_run(name="run", **changes)``: a validated TrainConfig for a seconds-long run in
    ``tmp_path / name``."""
    from lorafit.config import make_config

    def make(name: str = "run", **changes: Any):
        return make_config(**{**TINY_RUN, "output_dir": str(tmp_path / name), **changes})

    return make


def _cpu_with(monkeypatch: pytest.MonkeyPatch, *flags: str) -> None:
    from lorafit.bench import env

    monkeypatch.setattr(env, "cpu_flags", lambda: {f: f in flags for f in env.MATRIX_FLAGS})


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU taken for one that multiplies bf16 in hardware (AMX), whatever it is: lorafit's
    choices there do not depend on the machine the tests run on (its products are slower here)."""
    _cpu_with(monkeypatch, "amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


@pytest.fixture
def avx2_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU taken for one that only emulates bf16 (AVX2, as the AMD EPYC 7003 machines)."""
    _cpu_with(monkeypatch, "avx2")


@pytest.fixture(scope="session")
def stsb_run() -> dict[str, Any]:
    """TrainConfig settings of a two-step STS-B run on the embedded model (copy before changing)."""
    return dict(STSB_RUN)


@pytest.fixture(scope="session")
def bf16_run(tmp_path_factory, stsb_run) -> tuple[Path, dict[str, Any]]:
    """That run trained in bf16 (its directory, its summary), for tests that only read it."""
    from lorafit.config import make_config
    from lorafit.train import train

    run = tmp_path_factory.mktemp("inference") / "run"
    return run, train(make_config(**stsb_run, precision="bf16", output_dir=str(run)))


@pytest.fixture(scope="session")
def tiny_cell() -> dict[str, Any]:
    """TrainConfig settings (a sweep's ``base``) for a cell of about a second (copy before changing)."""
    return dict(TINY_CELL)


@pytest.fixture(scope="session")  # a factory: module-scoped fixtures may use it too
def interrupt_after() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with interrupt_after(n):`` training raises KeyboardInterrupt as it counts step n + 1, that is
    after step n and its checkpoint (if it has one), before anything of step n + 1 is saved."""
    from lorafit.progress import Progress

    @contextlib.contextmanager
    def armed(step: int) -> Iterator[None]:
        advance = Progress.advance

        def advance_then_stop(self, *args, **kwargs):
            advance(self, *args, **kwargs)
            if self.step > step:
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Progress, "advance", advance_then_stop)
            yield

    return armed

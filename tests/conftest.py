"""Fixtures shared across test folders: a tiny random BERT saved as a model folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, hidden-32 random BERT with the embedded model's tokenizer, saved like a Hub
    model: ``--model DIR`` trains and predicts with it in milliseconds per batch."""
    from transformers import BertConfig, BertModel

    from lorafit.models import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    # The encoder alone, like a pretrained checkpoint: every task gets a fresh head of its size.
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine, thread hand-offs cost more than tiny models' math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

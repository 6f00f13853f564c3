"""LoRA in a whole model: LoRA's numerical contract on tiny BERT, RoBERTa and DeBERTa-v2,
what is trainable, merging and export, and parameter counts on the paper's architectures."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lorafit.errors import LorafitError
from lorafit.lora import (
    LoRAConfig,
    LoRALinear,
    count_parameters,
    find_target_modules,
    head_module_names,
    inject_lora,
    lora_config_of,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from lorafit.models import build_from_config


def _expected_targets(layout) -> set[str]:
    return {f"{layout.encoder}.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in layout.targets}


def _head_param_names(model, layout) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in layout.heads)}


def _lora_param_names(model) -> set[str]:
    return {f"{name}.{p}" for name, layer in lora_layers(model) for p in layer.adapter_params()}


def test_default_targets_and_trainable_heads(tiny_model, arch, layout):
    model = inject_lora(tiny_model(arch), LoRAConfig(r=4, alpha=8))
    assert {name for name, _ in lora_layers(model)} == _expected_targets(layout)
    assert sorted(head_module_names(model)) == sorted(layout.heads)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _lora_param_names(model) | _head_param_names(model, layout)
    assert _head_param_names(model, layout)  # the head really has parameters
    if arch == "roberta":  # the two-layer head is trained whole
        assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= trainable
    if arch == "deberta-v2":  # the pooler is freshly initialised, so it is trained too
        assert {"pooler.dense.weight", "pooler.dense.bias"} <= trainable
    # everything else, embeddings and LayerNorms included, is frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embeddings" in n)
    assert lora_config_of(model).target_modules == list(layout.targets)


def test_head_is_never_adapted_even_if_targets_match_it(tiny_model):
    # "dense" names linears in every layer and in RoBERTa's head: the head stays a plain,
    # fully trained module.
    model = inject_lora(tiny_model("roberta"), LoRAConfig(r=2, alpha=2, target_modules=["dense"]))
    names = {name for name, _ in lora_layers(model)}
    assert names and not any(n.startswith("classifier") for n in names)
    assert type(model.classifier.dense) is torch.nn.Linear
    assert model.classifier.dense.weight.requires_grad


def test_target_regex_matches_full_name(tiny_model):
    model = tiny_model("bert")
    cfg = LoRAConfig(target_modules=r".*layer\.1\.attention\.self\.(key|value)")
    assert find_target_modules(model, cfg) == [
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_output_at_init_equals_base_exactly(tiny_model, arch, logits_of):
    base = logits_of(tiny_model(arch))
    model = inject_lora(tiny_model(arch), LoRAConfig(r=4, alpha=8))
    assert torch.equal(logits_of(model), base)


def test_merge_unmerge_and_export_agree(tiny_model, arch, logits_of, randomize, tmp_path):
    base = logits_of(tiny_model(arch))
    model = inject_lora(tiny_model(arch), LoRAConfig(r=4, alpha=8))
    randomize(model)
    unmerged = logits_of(model)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the function

    merge_lora(model)
    assert all(layer.merged for _, layer in lora_layers(model))
    merged = logits_of(model)
    unmerge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))
    again = logits_of(model)

    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert lora_config_of(model) is None and not hasattr(model, "lora_state")
    model.save_pretrained(tmp_path)
    exported, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    from_disk = logits_of(exported.eval())

    for other in (merged, again, from_disk):
        assert (other - unmerged).abs().max() <= 1e-5
    assert (from_disk - base).abs().max() > 1e-3


def test_merging_twice_changes_nothing(tiny_model, arch, randomize):
    model = inject_lora(tiny_model(arch), LoRAConfig(r=4, alpha=8))
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    changed = {k for k in once if not torch.equal(once[k], before[k])}
    assert changed == {f"{name}.base_layer.weight" for name, _ in lora_layers(model)}
    merge_lora(model)
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())


def test_optimizer_step_moves_only_lora_and_head(tiny_model, arch, layout, batch, randomize):
    model = inject_lora(tiny_model(arch), LoRAConfig(r=4, alpha=8))
    randomize(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # All parameters go to the optimizer, with weight decay: a frozen weight must still not move.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(**batch).loss.backward()
    optimizer.step()

    lora = _lora_param_names(model)
    head = _head_param_names(model, layout)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == lora | head
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora | head)


def test_first_step_from_zero_b_moves_b_not_a(tiny_model, batch):
    # With B = 0 the gradient of A is zero (dL/dA = scaling * B^T ...), so only B and the head move.
    model = inject_lora(tiny_model("bert"), LoRAConfig(r=4, alpha=8))
    model.train()
    a_before = {n: layer.lora_A.weight.detach().clone() for n, layer in lora_layers(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)  # decay would move A itself
    model(**batch).loss.backward()
    optimizer.step()
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_A.weight, a_before[name])
        assert layer.lora_B.weight.abs().max() > 0


def test_injecting_twice_is_refused(tiny_model):
    model = inject_lora(tiny_model("bert"), LoRAConfig(r=4, alpha=8))
    with pytest.raises(LorafitError, match="already has LoRA layers"):
        inject_lora(model, LoRAConfig(r=4, alpha=8))


def test_targets_matching_nothing_list_what_was_tried(tiny_model):
    model = tiny_model("roberta")
    with pytest.raises(LorafitError) as info:
        inject_lora(model, LoRAConfig(target_modules=["q_proj", "v_proj"]))
    message = str(info.value)
    assert "target_modules" in message and "q_proj, v_proj" in message
    assert "query" in message and "value" in message  # names the model does have
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # the model was left untouched


def test_default_targets_of_other_architecture_match_nothing(tiny_model):
    # DeBERTa-v2's names on BERT: same error, naming the regex/list tried.
    with pytest.raises(LorafitError, match="query_proj, value_proj"):
        inject_lora(tiny_model("bert"), LoRAConfig(target_modules=["query_proj", "value_proj"]))
    with pytest.raises(LorafitError, match=r"nothing_\.\*"):
        inject_lora(tiny_model("bert"), LoRAConfig(target_modules=r"nothing_.*"))


# Paper (Hu et al., 2022), Table 2: trainable LoRA parameters with r=8 on W_q, W_v for RoBERTa
# and r=16 for DeBERTa XXL. Full model sizes with a 2-label head are measured anchors.
@pytest.mark.parametrize(
    ("name", "r", "adapter", "total_base"),
    [
        ("roberta-base", 8, 294_912, 124_647_170),
        ("roberta-large", 8, 786_432, None),
        ("deberta-v2-xlarge", 16, 2_359_296, 886_957_058),
        ("deberta-v2-xxlarge", 16, 4_718_592, None),
    ],
)
def test_parameter_counts_match_the_paper(name, r, adapter, total_base):
    model = build_from_config(name)  # meta device: shapes only
    assert next(model.parameters()).is_meta
    base_total = sum(p.numel() for p in model.parameters())
    if total_base is not None:
        assert base_total == total_base
    inject_lora(model, LoRAConfig(r=r, alpha=16))
    count = count_parameters(model)
    assert count.adapter == adapter
    assert count.head > 0
    assert count.trainable == count.adapter + count.head
    assert count.total == base_total + adapter
    head_total = sum(p.numel() for h in head_module_names(model) for p in model.get_submodule(h).parameters())
    assert count.head == head_total
    assert 0 < count.trainable_fraction < 0.01


def test_roberta_base_trainable_matches_peft_measurement():
    # Measured with PEFT (r=8 on query/value, head trained): 887,042 trainable parameters.
    model = inject_lora(build_from_config("roberta-base"), LoRAConfig(r=8, alpha=8))
    assert count_parameters(model).trainable == 887_042


def test_count_without_lora_is_head_only(tiny_model):
    model = tiny_model("bert")
    count = count_parameters(model)
    assert count.adapter == 0
    assert count.head == sum(p.numel() for p in model.classifier.parameters())
    assert count.trainable == count.total == sum(p.numel() for p in model.parameters())

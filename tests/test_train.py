"""The training loop on the real embedded model (MiniLM), a few steps at a time on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafit import fastpath
from lorafit.cli import train_seeds
from lorafit.config import make_config
from lorafit.errors import LorafitError
from lorafit.train import linear_schedule, make_optimizer, train


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup=4, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert opt.param_groups[0]["lr"] == 0.0  # the seed project's LinearLR never decayed


def test_optimizer_decays_weights_but_not_biases_or_layernorm(tmp_path, tiny_run):
    from lorafit.data import get_task
    from lorafit.train import build_model

    cfg = tiny_run(method="full", weight_decay=0.1)
    model = build_model(cfg, get_task("rte"))
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "classifier.weight" in decayed and "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert "classifier.bias" in plain and "bert.embeddings.LayerNorm.weight" in plain
    assert not any(n.endswith("bias") for n in decayed)


def test_lora_run_writes_run_directory_and_trains_only_adapter_and_head(tmp_path, tiny_run):
    summary = train(tiny_run(max_steps=6, eval_steps=3))
    run = tmp_path / "run"
    assert summary["status"] == "finished" and summary["steps"] == 6
    counts = summary["trainable_parameters"]
    # MiniLM, r=8 on query and value: 6 layers x 2 x 8 x (384 + 384) = 73,728; head 384 x 2 + 2.
    assert counts["adapter"] == 73_728 and counts["head"] == 770
    assert counts["trainable"] == counts["adapter"] + counts["head"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    assert all(0.0 <= line["accuracy"] <= 1.0 for line in lines)
    assert summary["best_metric"] == max(line["accuracy"] for line in lines)
    assert summary["examples_per_second"] > 0 and summary["peak_memory_gib"] > 0
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("query.lora_A.weight") for k in saved)
    assert "base_model.model.classifier.weight" in saved
    assert (run / "checkpoint" / "state.json").exists()
    assert json.loads((run / "summary.json").read_text())["best_metric"] == summary["best_metric"]
    # The embedded model's folder exists only on this machine: the adapter names its Hub id.
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_lora_b_and_head_move_while_base_stays(tmp_path, tiny_run):
    from lorafit.lora import load_adapter
    from lorafit.models import load_model

    train(tiny_run(max_steps=4, eval_steps=4, learning_rate=1e-3))
    base, _ = load_model("minilm", 2)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    load_adapter(base, tmp_path / "run" / "adapter")
    for name, layer in [(n, m) for n, m in base.named_modules() if hasattr(m, "lora_B")]:
        assert layer.lora_B.weight.abs().sum() > 0, name
        assert torch.equal(layer.base_layer.weight, reference[f"{name}.weight"]), name
    assert not torch.equal(base.classifier.weight, reference["classifier.weight"])


@pytest.mark.parametrize("fast_dropout", [False, True])
def test_resume_after_interruption_is_bit_identical(tmp_path, tiny_run, interrupt_after, fast_dropout):
    common = {"max_steps": 12, "eval_steps": 6, "save_steps": 4, "lora_dropout": 0.1, "fast_dropout": fast_dropout}
    train(tiny_run("straight", **common))
    with interrupt_after(10), pytest.raises(KeyboardInterrupt):  # the last checkpoint: step 8
        train(tiny_run("resumed", **common))
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8
    # How often it logs and checkpoints may change on --resume (other threads or eval batches would
    # too, but they change float rounding, so not here, where the result must be bit-identical).
    train(tiny_run("resumed", resume=True, **{**common, "log_steps": 3, "save_steps": 5}))
    a = load_file(tmp_path / "straight" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "train_seconds"}
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]


def test_vectorised_masks_train_the_same_weights_as_pytorchs_kernel(tmp_path, tiny_run, monkeypatch):
    from lorafit import mt_masks

    assert mt_masks.available()  # its one-off check draws masks too: done before counting
    calls = []
    kernel = mt_masks._fill
    monkeypatch.setattr(mt_masks, "_fill", lambda *a, **k: calls.append(a[3] is not None) or kernel(*a, **k))
    # MRPC's pairs, unlike RTE's at 64 tokens, leave padding in the evaluation batches too
    # The full last layer on both sides: its first-row cut asks the attention with one query only
    # through lorafit's attention, which rounds otherwise than SDPA's rows (tests/test_head_row.py).
    common = {"task": "mrpc", "max_steps": 4, "eval_steps": 4, "lora_dropout": 0.1, "cls_only_last_layer": False}
    runs = {}
    for on in (True, False):
        calls.clear()
        runs[on] = train(tiny_run(f"vectorised-{on}", vectorised_masks=on, **common))
        assert runs[on]["speed"]["vectorised_masks"] is on
        # Every mask or none, each written as dropout's scaled noise: 4 steps x (the embeddings', 6
        # layers x (attention probabilities, 2 hidden states, 2 LoRA inputs), the head's)
        assert calls == ([True] * 4 * (1 + 6 * 5 + 1) if on else [])
        # SDPA's math path reproduced (without its masked-row checks) where the masks are vectorised
        assert runs[on]["speed"]["attention"] == ("lorafit_vectorised_masks" if on else "sdpa")
    a = load_file(tmp_path / "vectorised-True" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "vectorised-False" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert runs[True]["best_metric"] == runs[False]["best_metric"]


def test_gradient_accumulation_matches_the_bigger_batch(tmp_path, monkeypatch, tiny_run):
    import lorafit.train as train_module

    build = train_module.build_model

    def without_dropout(cfg, task):  # dropout would make the two runs differ by chance alone
        model = build(cfg, task)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    monkeypatch.setattr(train_module, "build_model", without_dropout)
    # Batches of 4 and of 8 are cut from the same shuffled order, so one step of 2 x 4
    # accumulated examples sees exactly the 8 examples of one big-batch step.
    # fp32: the tolerance below is fp32's; bf16 rounds the two batch splits differently.
    common = {"max_steps": 2, "eval_steps": 2, "group_by_length": False, "learning_rate": 1e-3, "precision": "fp32"}
    train(tiny_run("big", batch_size=8, **common))
    train(tiny_run("accum", batch_size=4, grad_accum=2, **common))
    a = load_file(tmp_path / "big" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "accum" / "checkpoint" / "trainable.safetensors")
    moved = 0.0
    for key in a:
        # Adam divides by sqrt(v): float noise in tiny gradients shows up at ~1e-6; lr is 1e-3.
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
        if key.endswith("lora_B.weight"):
            moved += a[key].abs().sum().item()
    assert moved > 0


def test_full_finetuning_saves_a_plain_model(tmp_path, tiny_run):
    summary = train(tiny_run(method="full", max_steps=2, eval_steps=2, learning_rate=5e-5))
    assert summary["trainable_parameters"]["trainable"] == summary["trainable_parameters"]["total"]
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert not (tmp_path / "run" / "adapter").exists()


def test_seeds_give_one_run_each_and_the_median(tmp_path, tiny_run):
    cfg = tiny_run("multi", max_steps=2, eval_steps=2, seeds=[1, 2, 3])
    result = train_seeds(cfg)
    assert result["seeds"] == [1, 2, 3] and len(result["values"]) == 3
    assert result["median"] == sorted(result["values"])[1]
    for seed in (1, 2, 3):
        assert json.loads((tmp_path / "multi" / f"seed-{seed}" / "summary.json").read_text())["seed"] == seed


def test_finished_run_is_not_overwritten_without_flag(tmp_path, tiny_run):
    train(tiny_run(max_steps=1, eval_steps=1))
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(LorafitError, match="finished run.*--overwrite"):
        train(tiny_run(max_steps=1, eval_steps=1))
    assert (tmp_path / "run" / "summary.json").read_text() == before
    train(tiny_run(max_steps=1, eval_steps=1, overwrite=True))


def test_init_adapter_copies_lora_factors_but_not_the_head(tmp_path, tiny_run):
    from lorafit.data import get_task
    from lorafit.lora import lora_layers
    from lorafit.train import build_model

    train(tiny_run("first", max_steps=3, eval_steps=3, learning_rate=1e-3))
    first = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    cfg = tiny_run("second", task="mrpc", init_adapter=str(tmp_path / "first" / "adapter"))
    model = build_model(cfg, get_task("mrpc"))
    for name, layer in lora_layers(model):
        assert torch.equal(layer.lora_B.weight, first[f"base_model.model.{name}.lora_B.weight"])
    assert not torch.equal(model.classifier.weight, first["base_model.model.classifier.weight"])


@pytest.mark.slow
def test_lora_learns_mrpc_beyond_the_majority_class(tmp_path):
    # The seed project's LoRA runs sat at the majority class (68.4% on MRPC dev) because its
    # head was frozen. Two real epochs on the full training set must do clearly better.
    cfg = make_config(task="mrpc", epochs=2, precision="bf16", lora_dropout=0.1, progress=False,
                      output_dir=str(tmp_path / "mrpc"))
    summary = train(cfg)
    assert summary["best_metrics"]["accuracy"] > 0.70
    assert summary["best_metrics"]["f1"] > 0.81


def test_modules_to_save_adds_the_pooler_to_the_trained_head(tmp_path, tiny_run):
    from lorafit.data import get_task
    from lorafit.lora import count_parameters
    from lorafit.train import build_model

    default = build_model(tiny_run(), get_task("rte"))
    assert not default.bert.pooler.dense.weight.requires_grad  # pretrained, frozen (PEFT's default too)
    with_pooler = build_model(tiny_run(modules_to_save=["classifier", "pooler"]), get_task("rte"))
    assert with_pooler.bert.pooler.dense.weight.requires_grad
    # The pooler adds 384 x 384 + 384 weights to the 770 of the classifier; the adapter is unchanged.
    assert count_parameters(with_pooler).head == 770 + 384 * 384 + 384
    assert count_parameters(with_pooler).adapter == count_parameters(default).adapter == 73_728
    with pytest.raises(LorafitError, match="--modules-to-save must be a non-empty list"):
        tiny_run(modules_to_save=[])


def test_bad_input_leaves_no_run_directory(tmp_path, tiny_run):
    with pytest.raises(LorafitError, match="no such folder"):
        train(tiny_run(model=str(tmp_path / "no-model")))
    with pytest.raises(LorafitError, match="unknown task"):
        train(tiny_run(task="nope"))
    assert not (tmp_path / "run").exists()


# -- run directory rules (no training) ---------------------------------------------------------


def _fake_checkpointed_run(cfg, folder: str = "checkpoint") -> None:
    """A run directory as an interrupted run leaves it: config.yaml and a checkpoint's state.json."""
    from lorafit.run import RunDir

    run = RunDir(cfg.output_dir)
    run.start(cfg)
    (run.path / folder).mkdir()
    (run.path / folder / "state.json").write_text(json.dumps({"step": 4}))


@pytest.mark.parametrize("field, value", [("log_steps", 3), ("save_steps", 5), ("eval_batch_size", 7),
                                          ("num_threads", 1), ("progress", True), ("vectorised_masks", False)])
def test_resume_accepts_changes_to_how_a_run_executes(tiny_run, field, value):
    from lorafit.run import RunDir

    cfg = tiny_run(max_steps=6)
    _fake_checkpointed_run(cfg)
    changed = cfg.replace(resume=True, **{field: value})
    RunDir(cfg.output_dir).check(changed)  # no error


@pytest.mark.parametrize("field, value", [("learning_rate", 1e-3), ("rank", 4), ("max_steps", 7), ("seed", 1),
                                          ("eval_steps", 2), ("max_eval_samples", 8), ("precision", "bf16"),
                                          ("fast_dropout", True)])
def test_resume_refuses_changes_to_what_a_run_learns(tiny_run, field, value):
    from lorafit.run import RunDir

    cfg = tiny_run(max_steps=6)
    _fake_checkpointed_run(cfg)
    with pytest.raises(LorafitError, match=f"--resume: settings differ from the run in .*: {field} "):
        RunDir(cfg.output_dir).check(cfg.replace(resume=True, **{field: value}))


def test_auto_precision_is_the_default_and_resumes_in_the_precision_the_run_recorded(tiny_run):
    from lorafit.run import RunDir

    assert tiny_run().precision == "auto"
    old = tiny_run(max_steps=6, precision="fp32")  # a run started when fp32 was the default
    _fake_checkpointed_run(old)
    run = RunDir(old.output_dir)
    assert run.changed_settings(old.replace(resume=True, precision="auto")) == []
    assert run.changed_settings(old.replace(resume=True, precision="bf16")) == ["precision"]
    assert fastpath.resolve_precision("auto", torch.device("cpu"), run.recorded_precision()) == "fp32"


def test_auto_run_records_its_resolved_precision_and_keeps_it_on_resume(tmp_path, tiny_run, interrupt_after,
                                                                        monkeypatch):
    from lorafit.bench import env

    common = {"max_steps": 4, "save_steps": 2, "eval_steps": 4}
    with interrupt_after(2), pytest.raises(KeyboardInterrupt):  # an fp32 run, checkpointed at step 2
        train(tiny_run("old", precision="fp32", **common))
    monkeypatch.setattr(env, "cpu_flags", lambda: {f: f == "amx_bf16" for f in env.MATRIX_FLAGS})
    summary = train(tiny_run("old", resume=True, **common))  # "auto" would now pick bf16
    assert summary["precision"] == "fp32"
    assert yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())["precision"] == "fp32"
    summary = train(tiny_run("new", **common))
    assert summary["precision"] == "bf16" and summary["speed"]["frozen_bf16"] is True
    assert yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())["precision"] == "bf16"


def test_a_crash_between_the_checkpoint_renames_resumes_from_checkpoint_old(tmp_path):
    from lorafit.run import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    first = {"w": torch.ones(2)}
    training_state = {"optimizer": {}, "scheduler": {}, "torch_rng": torch.get_rng_state()}  # what load checks
    run.save_checkpoint(first, training_state, {"step": 1})
    # The state of a crash after `checkpoint` was renamed to `checkpoint.old` and before
    # `checkpoint.new` took its place: only the old one is complete.
    run.checkpoint.rename(run.path / "checkpoint.old")
    assert run.has_checkpoint() and run.checkpoint_step() == 1
    trainable, _training_state, state = run.load_checkpoint()
    assert torch.equal(trainable["w"], first["w"]) and state == {"step": 1}
    # The next save puts a complete checkpoint in place and removes the old one.
    run.save_checkpoint({"w": torch.zeros(2)}, training_state, {"step": 2})
    assert run.checkpoint_step() == 2 and not (run.path / "checkpoint.old").exists()


VALID = {"task": "rte"}


@pytest.mark.parametrize("changes, message", [
    ({"rank": 0}, "--rank must be > 0, got 0"),
    ({"rank": 2.5}, "--rank must be an integer, got 2.5"),
    ({"alpha": 0.0}, "--alpha must be > 0, got 0.0"),
    ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1), got 1.0"),
    ({"target_modules": []}, "--target-modules must be a non-empty list of module names, got []"),
    ({"target_modules": "query"}, "--target-modules must be a non-empty list of module names, got 'query'"),
    ({"modules_to_save": ["classifier", ""]}, "--modules-to-save must be a non-empty list of module names"),
    ({"batch_size": 0}, "--batch-size must be > 0, got 0"),
    ({"batch_size": True}, "--batch-size must be an integer, got True"),
    ({"max_steps": -1}, "--max-steps must be > 0, got -1"),
    ({"learning_rate": "fast"}, "--learning-rate must be a finite number, got 'fast'"),
    ({"weight_decay": -0.1}, "--weight-decay must be >= 0, got -0.1"),
    ({"warmup_ratio": 1.5}, "--warmup-ratio must be in [0, 1), got 1.5"),
    ({"classifier_dropout": -0.5}, "--classifier-dropout must be in [0, 1), got -0.5"),
    ({"method": "adapter"}, "--method must be one of 'lora', 'full', got 'adapter'"),
    ({"precision": "fp8"}, "--precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
    ({"method": "full", "init_adapter": "a"}, "--init-adapter applies to --method lora"),
    ({"method": "full", "head_learning_rate": 1e-4}, "--head-learning-rate applies to --method lora"),
    ({"text_columns": ["a", "b", "c"]}, "--text-columns takes one or two column names"),
    ({"train_file": "t.csv"}, "custom data needs both --train-file and --validation-file"),
    ({"train_file": "t.csv", "validation_file": "v.csv", "data_dir": "d"}, "--data-dir and --train-file"),
    ({"resume": True, "overwrite": True}, "--resume continues a run and --overwrite replaces it; give one"),
    ({"seeds": [1, 1]}, "--seeds must be distinct integers, got [1, 1]"),
])
def test_train_config_rejects_each_bad_value_naming_its_flag(changes, message):
    from lorafit.config import TrainConfig

    with pytest.raises(LorafitError) as e:
        TrainConfig(**{**VALID, **changes})
    assert message in str(e.value)


def test_field_tags_give_the_lists_the_rest_of_lorafit_uses():
    from lorafit.config import LORA_ONLY, NOT_SETTINGS, ONE_OFF_KEYS, PER_RUN_KEYS, RUNTIME_KEYS

    assert RUNTIME_KEYS == {"eval_batch_size", "output_dir", "overwrite", "resume", "save_steps", "log_steps",
                            "num_threads", "progress", "device", "report_to", "reuse_memory", "allocator",
                            "vectorised_masks", "cls_only_last_layer"}
    assert PER_RUN_KEYS == {"output_dir", "overwrite", "resume", "seeds"}
    assert set(LORA_ONLY) == {"rank", "alpha", "lora_dropout", "target_modules", "use_rslora", "modules_to_save",
                              "init_adapter", "use_dora", "init_lora_weights", "loraplus_lr_ratio",
                              "head_learning_rate"}
    assert NOT_SETTINGS == RUNTIME_KEYS | {"seed", "seeds"}
    assert ONE_OFF_KEYS == {"resume", "overwrite", "progress", "seeds"}


def test_lora_config_carries_every_lora_setting():
    from lorafit.config import TrainConfig

    lora = TrainConfig(rank=4, alpha=8.0, lora_dropout=0.1, target_modules=["query"], use_rslora=True,
                       modules_to_save=["classifier", "pooler"]).lora_config()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_rslora, lora.modules_to_save) == (
        4, 8.0, 0.1, ["query"], True, ["classifier", "pooler"])

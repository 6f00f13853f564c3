"""--report-to: TensorBoard event files hold the logged scalars and the config; missing packages fail early."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lorafit.config import make_config
from lorafit.errors import LorafitError
from lorafit.train import train


def tiny(tiny_model_dir, tmp_path, **changes):
    settings = {"task": "rte", "model": str(tiny_model_dir), "max_train_samples": 32, "max_eval_samples": 16,
                "batch_size": 8, "max_length": 64, "max_steps": 4, "eval_steps": 2, "log_steps": 1,
                "progress": False, "output_dir": str(tmp_path / "run")}
    return make_config(**{**settings, **changes})


def test_tensorboard_event_file_holds_loss_lr_speed_and_dev_metrics(tiny_model_dir, tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny(tiny_model_dir, tmp_path, report_to="tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(scalars) == {"train/loss", "train/learning_rate", "train/examples_per_second", "eval/accuracy"}
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert all(0.3 < loss < 1.5 for _, loss in scalars["train/loss"])  # about ln 2 for two classes
    assert scalars["train/learning_rate"][-1][1] == 0.0  # linear decay ends at zero
    assert all(speed > 0 for _, speed in scalars["train/examples_per_second"])
    # Every evaluation, at its step, with the values metrics.jsonl records.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert scalars["eval/accuracy"] == [(r["step"], pytest.approx(r["accuracy"])) for r in records]


def test_tensorboard_records_the_run_config_as_hyperparameters(tiny_model_dir, tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    train(tiny(tiny_model_dir, tmp_path, report_to="tensorboard", rank=4))
    (hparams_dir,) = [p for p in (tmp_path / "run" / "tensorboard").iterdir() if any(p.glob("events.*"))]
    events = EventAccumulator(str(hparams_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["rank"].number_value == 4
    assert hparams["task"].string_value == "rte"
    assert hparams["report_to"].string_value == "tensorboard"


def test_without_report_to_no_tracker_files_are_written(tiny_model_dir, tmp_path, one_thread):
    train(tiny(tiny_model_dir, tmp_path, max_steps=2))
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_package_names_the_flag_and_writes_nothing(tracker, tiny_model_dir, tmp_path):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(LorafitError, match=f"--report-to {tracker}: the '{tracker}' package is not installed"):
        train(tiny(tiny_model_dir, tmp_path, report_to=tracker))
    assert not (tmp_path / "run").exists()


def test_report_to_rejects_unknown_trackers(tiny_model_dir, tmp_path):
    with pytest.raises(LorafitError, match="--report-to must be one of 'none', 'tensorboard', 'wandb', 'mlflow'"):
        tiny(tiny_model_dir, tmp_path, report_to="comet")

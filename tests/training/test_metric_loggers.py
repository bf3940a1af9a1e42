"""Metric loggers: one log call reaches jsonl, stdout, TensorBoard (and wandb) with the same values."""

import sys
import types

import pytest

from mytune.errors import ConfigError
from mytune.training.metrics import build_metric_loggers, check_metric_loggers, read_metrics

ROWS = [
    {"step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-5, "grad_norm": None, "tokens_per_s": 1234.5678},
    {"step": 2, "epoch": 0, "loss": 2.25, "lr": 2e-5, "grad_norm": 0.75, "tokens_per_s": 1300.0},
]


def test_jsonl_stdout_and_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="pip install tensorboard to test the TensorBoard logger")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = build_metric_loggers(tmp_path, ["jsonl", "stdout", "tensorboard", "jsonl"])
    assert len(logger.loggers) == 3
    for row in ROWS:
        logger.log(row)
    logger.close()

    assert read_metrics(tmp_path / "metrics.jsonl") == ROWS
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "step 1 | epoch 0 | grad_norm None | loss 2.5 | lr 1e-05 | tokens_per_s 1234.6",
        "step 2 | epoch 0 | grad_norm 0.75 | loss 2.25 | lr 2e-05 | tokens_per_s 1300",
    ]

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"epoch", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(1, 2.5), (2, 2.25)]
    assert [e.step for e in accumulator.Scalars("grad_norm")] == [2]  # None is not logged
    assert accumulator.Scalars("lr")[1].value == pytest.approx(2e-5)


def test_unknown_or_missing_loggers_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="'tensorbord' is not known; did you mean 'tensorboard'"):
        check_metric_loggers(["jsonl", "tensorbord"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install wandb$"):
        check_metric_loggers(["wandb"])
    with pytest.raises(ConfigError, match=r"pip install tensorboard$"):
        check_metric_loggers(["stdout", "tensorboard"])


def test_wandb_logger_calls(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = build_metric_loggers(tmp_path, ["wandb"], run_name="r1", config={"lr": 1e-5})
    logger.log(ROWS[0])
    logger.close()
    assert calls == [
        ("init", {"project": "mytune", "name": "r1", "dir": str(tmp_path), "config": {"lr": 1e-5}}),
        ("log", {"epoch": 0.0, "loss": 2.5, "lr": 1e-5, "tokens_per_s": 1234.5678}, 1),
        ("finish",),
    ]


def test_run_summary_names_the_numbers_the_checkpoint_and_what_to_run_next(tmp_path):
    from mytune.training.metrics import run_summary

    text = run_summary("full_finetune_single_device", 474, {"loss": 1.936, "val_loss": 2.4393,
                                                             "val_perplexity": 11.46, "tokens_per_s": 17035.2},
                       tmp_path / "out" / "step_474")
    first, *rest = text.splitlines()
    assert first == ("full_finetune_single_device done: 474 steps, final train loss 1.9360, val_loss 2.4393 "
                     "(perplexity 11.46), 17,035 tokens/s")
    assert f"checkpoint: {tmp_path / 'out' / 'step_474'}" in rest[0] and "metrics.jsonl" in rest[0]
    assert any("mytune generate" in line for line in rest) and any("mytune cp" in line for line in rest)
    assert any("mytune download" in line for line in rest)


def test_run_summary_of_a_preference_run_gives_the_held_out_reward_accuracy(tmp_path):
    from mytune.training.metrics import run_summary

    last = {"loss": 0.31, "val_loss": 0.3120, "val_rewards/accuracies": 0.866, "tokens_per_s": 2500.0}
    first = run_summary("lora_dpo_single_device", 92, last, tmp_path / "step_92", adapter=True).splitlines()[0]
    assert first == ("lora_dpo_single_device done: 92 steps, final train loss 0.3100, val_loss 0.3120, "
                     "val_rewards/accuracies 0.866, 2,500 tokens/s")

"""Metric logging shared by every recipe: one JSON object per logged step in `<output_dir>/metrics.jsonl`, plus
optional stdout / TensorBoard / Weights & Biases loggers behind one `MetricLogger` protocol.

Definition used everywhere: `tokens_per_s` counts the non-padding input tokens the model processed (prompt and
response alike) divided by the wall-clock seconds of the optimizer steps since the previous log line.
"""

import difflib
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from mytune.errors import ConfigError


class JsonlMetricLogger:
    """Appends metric dicts to a JSONL file, flushed line by line so a killed run keeps what it logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps(metrics, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The logged rows of a metrics.jsonl file, in order."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep the rows of `path` (a metrics.jsonl) up to `last_step`: a run resumed at step N (0: a fresh start) logs
    the steps after N again, so each step keeps one row. Rows cut off by a kill mid-write are dropped too. The file is
    rewritten via a temporary file and a rename; a missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


class MetricLogger(Protocol):
    """What a recipe logs to: `log` one dict per logged step (with a "step" key), `close` at the end."""

    def log(self, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


METRIC_LOGGERS = ("jsonl", "stdout", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger name -> module it needs (pip name is the same)


class StdoutMetricLogger:
    """One line per logged step on stdout: `step 10 | epoch 0 | loss 1.2346 | lr 2e-05 | ...` (for plain-text logs
    of batch jobs, where a progress bar is not kept)."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream

    def log(self, metrics: dict[str, Any]) -> None:
        items = sorted(metrics.items(), key=lambda kv: (kv[0] not in ("step", "epoch"), kv[0] != "step", kv[0]))
        line = " | ".join(f"{key} {_format_value(value)}" for key, value in items)
        print(line, file=self._stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics dict other than `step` (None, strings and booleans are left out)."""
    return {key: float(value) for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardMetricLogger:
    """Scalars into a TensorBoard event file under `log_dir` (`tensorboard --logdir <output_dir>/tensorboard`),
    flushed at every logged step so a killed run keeps what it logged."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"metric logger 'tensorboard' needs the tensorboard package: pip install tensorboard "
                              f"({err})") from err
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: dict[str, Any]) -> None:
        step = metrics.get("step")
        for key, value in _scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbMetricLogger:
    """A Weights & Biases run (files under `output_dir/wandb`). Offline runs: set `WANDB_MODE=offline` in the
    environment (wandb reads it; `wandb sync` uploads later); this logger does not override it."""

    def __init__(self, output_dir: str | Path, *, project: str | None = None, run_name: str | None = None,
                 config: dict | None = None):
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(f"metric logger 'wandb' needs the wandb package: pip install wandb ({err})") from err
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=project or "mytune", name=run_name, dir=str(output_dir), config=config)

    def log(self, metrics: dict[str, Any]) -> None:
        self._run.log(_scalars(metrics), step=metrics.get("step"))

    def close(self) -> None:
        self._run.finish()


class MultiMetricLogger:
    """Fans each `log` out to several loggers; `close` closes them all."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = list(loggers)

    def log(self, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(metrics)

    def close(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as err:  # close the others anyway, then report the first failure
                errors.append(err)
        if errors:
            raise errors[0]


def check_metric_loggers(names: list[str]) -> None:
    """Raise a ConfigError for an unknown logger name or a missing package (for params validation, before the
    model is loaded): "metric_loggers: 'tensorbord' is not known; did you mean 'tensorboard'? ..."."""
    for name in names:
        if name not in METRIC_LOGGERS:
            close = difflib.get_close_matches(name, METRIC_LOGGERS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"metric_loggers: {name!r} is not known; {hint}choose from {', '.join(METRIC_LOGGERS)}")
        if name in _PACKAGES:
            try:
                importlib.import_module(_PACKAGES[name])
            except ImportError:
                raise ConfigError(f"metric logger {name!r} needs the {_PACKAGES[name]} package: "
                                  f"pip install {_PACKAGES[name]}") from None


def build_metric_loggers(output_dir: str | Path, names: list[str], *, project: str | None = None,
                         run_name: str | None = None, config: dict | None = None) -> MultiMetricLogger:
    """One logger that writes to each of `names` ("jsonl", "stdout", "tensorboard", "wandb"; duplicates ignored).

    jsonl -> `output_dir/metrics.jsonl`; tensorboard -> `output_dir/tensorboard/`; wandb -> a run in `project`
    named `run_name` with `config` (e.g. the recipe params as a dict) and files under `output_dir`. Build it on
    rank 0 only. Raises ConfigError for an unknown name or a missing package.
    """
    check_metric_loggers(names)
    output_dir = Path(output_dir)
    loggers: list[MetricLogger] = []
    for name in dict.fromkeys(names):
        if name == "jsonl":
            loggers.append(JsonlMetricLogger(output_dir / "metrics.jsonl"))
        elif name == "stdout":
            loggers.append(StdoutMetricLogger())
        elif name == "tensorboard":
            loggers.append(TensorBoardMetricLogger(output_dir / "tensorboard"))
        else:
            loggers.append(WandbMetricLogger(output_dir, project=project, run_name=run_name, config=config))
    return MultiMetricLogger(loggers)


def run_summary(recipe: str, steps: int, last: dict, checkpoint: str | Path, *, adapter: bool = False) -> str:
    """The lines a run ends with: where it got (final train / validation loss, throughput), where its checkpoint
    is, and the commands a user runs next."""
    numbers = [f"{steps} steps"]
    if "loss" in last:
        numbers.append(f"final train loss {last['loss']:.4f}")
    if "val_loss" in last:
        perplexity = f" (perplexity {last['val_perplexity']:.2f})" if "val_perplexity" in last else ""
        numbers.append(f"val_loss {last['val_loss']:.4f}{perplexity}")
    if "val_rewards/accuracies" in last:  # preference recipes: the held-out pairs whose right answer gains
        numbers.append(f"val_rewards/accuracies {last['val_rewards/accuracies']:.3f}")
    if "tokens_per_s" in last:
        numbers.append(f"{last['tokens_per_s']:,.0f} tokens/s")
    what = "merged model (Hugging Face format), PEFT adapter in adapter/" if adapter else "Hugging Face format"
    return "\n".join([
        f"{recipe} done: {', '.join(numbers)}",
        f"  checkpoint: {checkpoint} ({what}; metrics in {Path(checkpoint).parent / 'metrics.jsonl'})",
        f"  try it:     mytune generate --override checkpoint_dir={checkpoint} prompt='...'"
        f"   (the demo: mytune generate --config tiny_demo)",
        f"  change it:  mytune cp {recipe} ./my_recipe.py   (then: mytune ./my_recipe.py --config ...)",
        f"  real model: mytune download meta-llama/Llama-3.2-1B-Instruct, then "
        f"mytune {recipe} --config llama3_2_1b --override checkpoint_dir=./models/Llama-3.2-1B-Instruct",
    ])


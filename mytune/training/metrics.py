"""Metric logging shared by every recipe: one JSON object per logged step in `<output_dir>/metrics.jsonl`.

Definition used everywhere: `tokens_per_s` counts the non-padding input tokens the model processed (prompt and
response alike) divided by the wall-clock seconds of the optimizer steps since the previous log line.
"""

import json
from pathlib import Path
from typing import Any


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

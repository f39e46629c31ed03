"""A run folder read back for comparison (compare.py, bench/history.py): its family, size, cost
and curves, from what train.py recorded.

Design decisions:
- Nothing is recomputed: the family is config.yaml's `model.arch`, the parameter count the
  `num_params` line each training process starts with, tokens seen the `tokens` field of each
  line, time its `elapsed_s` (trainer/metrics.py describes the lines). A value the run did not
  record shows as unknown rather than guessed.
- `elapsed_s` is the clock of the process that wrote the line. A resumed run's time continues
  from the last time recorded before it (its `num_params` line marks where a process starts), so
  a run trained in several sittings is one curve.
- Evaluation lines (they have `val_loss`) also carry the mean train loss since the previous
  evaluation; a `train_loss` curve uses the per-log lines only, so no step is drawn twice.
- A line that does not parse (torn by a kill mid-write) is skipped, as resuming does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import UserError
from trainer.rundir import METRICS

CURVES = ("val_bpb", "val_loss", "train_loss")  # what a curve can show
AXES = ("iter", "time", "tokens")  # what it can be drawn against


@dataclass
class Run:
    name: str  # how tables and legends call it: the folder as given, unless named
    family: str  # model.arch
    rows: list[dict]  # metrics.jsonl, with `time` added: elapsed_s continued across resumes

    @property
    def num_params(self) -> int | None:
        return next((r["num_params"] for r in reversed(self.rows) if "num_params" in r), None)

    @property
    def tokens(self) -> int | None:
        return max((r["tokens"] for r in self.rows if r.get("tokens") is not None), default=None)

    @property
    def wall_s(self) -> float | None:
        return max((r["time"] for r in self.rows if "time" in r), default=None)

    def best(self, metric: str) -> float | None:
        return min((v for v in (r.get(metric) for r in self.rows if "val_loss" in r) if v is not None), default=None)

    def last(self, metric: str) -> float | None:
        """At the last evaluation: the end of the run, over the whole val split."""
        return next((r.get(metric) for r in reversed(self.rows) if "val_loss" in r), None)

    def curve(self, metric: str, x: str) -> list[tuple[float, float]]:
        """(x, metric) points, in the order they were logged; lines lacking either are left out."""
        evaluations = metric.startswith("val_")
        return [(r[x], r[metric]) for r in self.rows
                if ("val_loss" in r) == evaluations and r.get(metric) is not None and r.get(x) is not None]


def read_run(folder: str | Path, name: str = "") -> Run:
    path = Path(folder)
    metrics, config = path / METRICS, path / "config.yaml"
    if not (metrics.is_file() and config.is_file()):
        raise UserError(f"{folder}: not a run folder (it needs the {METRICS} and config.yaml train.py writes)")
    try:
        cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{folder}: cannot read the run ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{config}: no model section; not a config train.py wrote")
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter"), int):
            rows.append(row)
    return Run(name or str(folder), model.get("arch", "gpt"), with_time(rows))


def with_time(rows: list[dict]) -> list[dict]:
    """Add `time` to the lines with `elapsed_s`: seconds since the run began, over all processes."""
    offset = last = 0.0
    for row in rows:
        if "num_params" in row:  # a process starts: its clock starts at zero
            offset = last
        if isinstance(row.get("elapsed_s"), (int, float)) and math.isfinite(row["elapsed_s"]):
            row["time"] = last = offset + row["elapsed_s"]
    return rows

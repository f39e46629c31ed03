"""Compare training runs: a table of what each cost and reached, and their curves in one PNG.

    python compare.py RUN_DIR... [--metric val_bpb|val_loss|train_loss] [--x iter|time|tokens] [--out runs.png]

Everything comes from what the runs recorded (trainer/runs.py reads a run folder), so runs of
different families, tokenizers and machines compare on what each reports. The default curve is
val bits per byte against wall time: the one scale that tokenizers and families share, against
the one cost every run pays. A run with a single evaluation (an n-gram counts once) is a point.

The table goes to stdout and needs nothing beyond the core install; the plot needs matplotlib
(`pip install -e ".[plot]"`), and without it says so in one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import UserError, report_user_errors
from common.files import atomic_file
from trainer.runs import AXES, CURVES, Run, read_run

AXIS_LABELS = {"iter": "iteration", "time": "wall time (s)", "tokens": "tokens seen"}
CURVE_LABELS = {"val_bpb": "val bits per byte", "val_loss": "val loss (nats per token)",
                "train_loss": "train loss (nats per token)"}


def human(n: float | None) -> str:
    """1234567 -> 1.23M; None (not recorded) -> -."""
    if n is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: list[Run]) -> str:
    header = ("run", "family", "params", "tokens", "wall time", "best val loss", "best val bpb")
    rows = [(run.name, run.family, human(run.num_params), human(run.tokens),
             "-" if run.wall_s is None else f"{run.wall_s:.1f}s", fixed(run.best("val_loss"), 4),
             fixed(run.best("val_bpb"), 4)) for run in runs]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)  # noqa: E731
                                 for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(header), *map(line, rows)])


def figure(runs: list[Run], metric: str, x: str):
    """A matplotlib Figure of each run's metric against x, or None when no run recorded any.
    Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure  # no pyplot: no display backend, no global state

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for run in runs:
        points = run.curve(metric, x)
        if not points:
            print(f"{run.name}: no {metric} against {x} recorded; not drawn", file=sys.stderr)
            continue
        xs, ys = zip(*points)
        # Markers on the sparse evaluation curves; a single point would be invisible without one.
        marker = "o" if len(points) == 1 or metric != "train_loss" else None
        ax.plot(xs, ys, marker=marker, markersize=6 if len(points) == 1 else 3, label=run.name)
    if not ax.lines:
        return None
    ax.set(xlabel=AXIS_LABELS[x], ylabel=CURVE_LABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot(runs: list[Run], metric: str, x: str, out: str | Path) -> bool:
    """Write the figure to the PNG `out`; False (having said why in one line) when it cannot."""
    try:
        fig = figure(runs, metric, x)
    except ImportError:
        print(f'{out}: not drawn; plotting needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        return False
    if fig is None:
        print(f"{out}: not drawn; no run recorded {metric} against {x}", file=sys.stderr)
        return False
    try:
        with atomic_file(out) as f:
            fig.savefig(f, format="png", dpi=120)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror})") from None
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compare training runs: a table, and their curves in one PNG.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (train.py's out_dir)")
    ap.add_argument("--metric", default="val_bpb", help=f"the curve: {' | '.join(CURVES)}")
    ap.add_argument("--x", default="time", help=f"against: {' | '.join(AXES)}")
    ap.add_argument("--out", default="runs.png", help="the PNG to write")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        # Checked here rather than by argparse, whose errors take two lines.
        if args.metric not in CURVES:
            raise UserError(f"--metric {args.metric!r} is not one of: {', '.join(CURVES)}")
        if args.x not in AXES:
            raise UserError(f"--x {args.x!r} is not one of: {', '.join(AXES)}")
        if not Path(args.out).resolve().parent.is_dir():
            raise UserError(f"--out {args.out}: its folder does not exist")
        runs = [read_run(folder) for folder in args.runs]
        print(table(runs))
        if plot(runs, args.metric, args.x, args.out):
            print(f"{args.out}: {args.metric} against {args.x}", file=sys.stderr)


if __name__ == "__main__":
    main()

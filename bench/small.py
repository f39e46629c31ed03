"""The default run, measured: `configs/small.yaml` end to end (prep, training, final evaluation
over the whole val split) as a new user runs it.

    python bench/small.py [key=value ...]

Prints the wall time of the whole command and the final val bits per byte (and loss, nats per token).
"""

import sys
import tempfile
from pathlib import Path

from harness import REPO, machine, train_run


def main():
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        run = train_run(str(REPO / "configs/small.yaml"), Path(tmp) / "out", *overrides)
    final = [r for r in run["rows"] if r.get("val_loss") is not None][-1]
    print(f"machine: {machine()}")
    print(f"configs/small.yaml {' '.join(overrides)}".strip())
    print(f"wall time {run['wall_s']:.1f} s, final val_bpb {final['val_bpb']:.4f}, val loss {final['val_loss']:.4f} "
          f"(whole val split, iter {final['iter']})")


if __name__ == "__main__":
    main()

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)

# A model small enough that a training run takes a couple of seconds on one CPU core.
# data.tokenizer=char: the tests' corpora are too small for the default's byte-level BPE.
TINY = ["data.tokenizer=char", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.batch_size=8", "train.device=cpu", "optim.warmup_iters=5", "train.log_interval=5",
        "train.eval_interval=10", "train.eval_batches=2"]


def run_py(*args, cwd=REPO, timeout=300, env=None, input=None):
    """Run a repo script in a fresh interpreter (stdin: `input`); returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small Shakespeare excerpt, so prep and training stay fast."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_excerpt.txt"
    path.write_text((REPO / "data/tinyshakespeare/input.txt").read_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_corpus) -> Path:
    """A finished tiny char-level run (30 steps); returns its out_dir."""
    root = tmp_path_factory.mktemp("run")
    out = root / "out"
    r = run_py("train.py", "configs/small.yaml", *TINY, "train.max_iters=30", f"out_dir={out}",
               f"data.input={tiny_corpus}", f"data.prepared_dir={root / 'prepared'}")
    assert r.returncode == 0, r.stderr
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny models gain nothing from threads, and on a shared machine each of torch's parallel
    regions can wait milliseconds for its second thread: these tests run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with torch_threads(1):
        yield

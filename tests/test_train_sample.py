import json

import torch

from tests.conftest import TINY, run_py
from trainer.checkpoint import load_checkpoint


def test_training_writes_checkpoints_metrics_and_config(tiny_run):
    for name in ("latest.pt", "best.pt", "metrics.jsonl", "config.yaml"):
        assert (tiny_run / name).is_file(), name
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert all("iter" in r for r in rows)
    train_rows = [r for r in rows if "tokens_per_sec" in r]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    assert train_rows and all(r["train_loss"] > 0 and r["lr"] > 0 and r["tokens_per_sec"] > 0 for r in train_rows)
    assert val_rows[-1]["iter"] == 30
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"], "the loss should go down"
    ckpt = load_checkpoint(tiny_run / "latest.pt")
    assert ckpt["iter"] == 30 and ckpt["config"]["model"]["n_layer"] == 2
    assert ckpt["tokenizer"]["kind"] == "char" and ckpt["config"]["model"]["vocab_size"] == len(ckpt["tokenizer"]["chars"])
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_fresh_run_refuses_existing_out_dir(tiny_run):
    before = (tiny_run / "latest.pt").read_bytes()
    r = run_py("train.py", "configs/small.yaml", *TINY, f"out_dir={tiny_run}")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (tiny_run / "latest.pt").read_bytes() == before


def test_resume_continues_from_checkpoint(tiny_run, tiny_corpus, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    prepared = tmp_path / "prepared"
    r = run_py("train.py", "configs/small.yaml", *TINY, "train.max_iters=40", f"out_dir={run}", "resume=true",
               f"data.input={tiny_corpus}", f"data.prepared_dir={prepared}")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run / "latest.pt")["iter"] == 40
    r = run_py("train.py", "configs/small.yaml", *TINY, "model.n_layer=3", f"out_dir={run}", "resume=true",
               f"data.input={tiny_corpus}")
    assert r.returncode == 2 and "model.n_layer" in r.stderr


def sample(ckpt, *args):
    return run_py("sample.py", "--ckpt", ckpt, "--device", "cpu", *args)


def test_sample_produces_requested_tokens_deterministically(tiny_run):
    a = sample(tiny_run, "--prompt", "ROMEO:", "--max-new-tokens", "57", "--seed", "7")
    assert a.returncode == 0, a.stderr
    text = a.stdout[:-1]  # a trailing newline ends the output
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 57  # char level: one char per token
    b = sample(tiny_run / "latest.pt", "--prompt", "ROMEO:", "--max-new-tokens", "57", "--seed", "7")
    assert b.stdout == a.stdout
    c = sample(tiny_run, "--prompt", "ROMEO:", "--max-new-tokens", "57", "--seed", "8")
    assert c.stdout != a.stdout


def test_sample_prompt_from_file_and_several_samples(tiny_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:")
    r = sample(tiny_run, "--prompt", f"@{prompt}", "--max-new-tokens", "20", "--num-samples", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("KING:") == 3


def test_sample_errors_are_one_line(tiny_run, tmp_path):
    r = sample(tmp_path / "missing")
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = sample(bad)
    assert r.returncode == 2 and "corrupt" in r.stderr
    r = sample(tiny_run, "--prompt", "ROMEO: \u20ac")
    assert r.returncode == 2 and "not in the char vocabulary" in r.stderr


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Evil()}, path)
    r = sample(path)
    assert r.returncode == 2 and "refused" in r.stderr and "pwned" not in r.stdout


def test_full_evaluations_are_bounded_and_alone_decide_a_stop(tmp_path, capsys):
    """Periodic estimates cover eval_batches batches; the final evaluation and the stop check cover
    the val split up to train.final_eval_tokens (here 10 windows of 32) and say how many tokens; a
    stop is decided by a full evaluation, triggered by an estimate within stop_margin of the target."""
    import train
    from tests.trainrun import make_data, train_args

    data = make_data(tmp_path)

    def val_rows(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["iter"], r["val_tokens"]) for r in rows if "val_loss" in r]

    bounded = ["train.eval_interval=4", "train.eval_batches=1", "train.final_eval_tokens=320"]
    train.main(train_args(data, tmp_path / "a", *bounded, "train.max_iters=8"))
    assert val_rows(tmp_path / "a") == [(4, 1 * 4 * 32), (8, 320)]  # batch 4 x context 32
    assert "estimate on 128 tokens" in capsys.readouterr().out
    train.main(train_args(data, tmp_path / "b", *bounded, "train.max_iters=8", "train.stop_at_val_loss=10"))
    assert val_rows(tmp_path / "b") == [(4, 320)]
    log = capsys.readouterr().out
    assert "then sample of the" in log and "320 tokens" in log and "<= train.stop_at_val_loss=10.0: stopping" in log

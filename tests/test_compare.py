"""compare.py and trainer/runs.py on real runs, and TensorBoard logging (trainer/metrics.py).

Two finished runs: the shared 30-step `tiny_run`, and a 10-step one of another size whose only
evaluation is the final one (as an n-gram's), trained in this process with `train.tensorboard`
on where the package is installed.
"""

import importlib.util
import json
import sys

import pytest

import compare
from tests.conftest import TINY
from trainer.checkpoint import load_checkpoint, load_model
from trainer.metrics import SCALARS, MetricsLog
from trainer.runs import Run, read_run, with_time

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def one_eval_run(tmp_path_factory, tiny_corpus):
    import train

    root = tmp_path_factory.mktemp("one-eval")
    train.main(["configs/small.yaml", *TINY, "model.n_layer=1", "train.max_iters=10", "train.eval_interval=100",
                f"train.tensorboard={HAVE_TENSORBOARD}", f"out_dir={root / 'out'}", f"data.input={tiny_corpus}",
                f"data.prepared_dir={root / 'prepared'}"])
    return root / "out"


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_table_shows_each_runs_family_size_cost_and_best_values(tiny_run, one_eval_run, capsys):
    compare.main([str(tiny_run), str(one_eval_run), "--out", str(one_eval_run.parent / "runs.png")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "family", "params", "tokens"]
    for run, line, steps in ((tiny_run, lines[1], 30), (one_eval_run, lines[2], 10)):
        name, family, params, tokens, wall, best_loss, best_bpb = line.split()
        assert (name, family) == (str(run), "gpt")
        assert params == compare.human(load_model(run)[0].num_params())
        assert tokens == compare.human(steps * 8 * 32)  # steps x batch x block
        assert float(wall.removesuffix("s")) == pytest.approx(rows(run)[-1]["elapsed_s"], abs=0.05)
        assert float(best_loss) == pytest.approx(load_checkpoint(run / "latest.pt")["best_val_loss"], abs=1e-4)
        assert float(best_bpb) == pytest.approx(min(r["val_bpb"] for r in rows(run) if "val_bpb" in r), abs=1e-4)
    assert lines[1].split()[2] != lines[2].split()[2], "the two runs differ in size"


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason='matplotlib is not installed (pip install -e ".[plot]")')
def test_the_png_draws_every_run_and_a_single_evaluation_as_a_point(tiny_run, one_eval_run, tmp_path):
    runs = [read_run(tiny_run), read_run(one_eval_run)]
    curve, point = compare.figure(runs, "val_bpb", "time").axes[0].lines
    assert len(curve.get_xdata()) == 3 and len(point.get_xdata()) == 1
    assert point.get_marker() == "o"  # a one-point line without a marker draws nothing
    assert compare.plot(runs, "val_loss", "tokens", tmp_path / "runs.png")
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_table_prints_and_one_line_says_how_to_plot(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    compare.main([str(tiny_run), "--out", str(tmp_path / "runs.png")])
    out, err = capsys.readouterr()
    assert str(tiny_run) in out.splitlines()[1]
    assert err.strip().splitlines() == [f'{tmp_path / "runs.png"}: not drawn; plotting needs matplotlib: '
                                        f'pip install -e ".[plot]"']
    assert not (tmp_path / "runs.png").exists()


@pytest.mark.parametrize("args, culprit", [
    (["{tmp}"], "not a run folder"), (["{run}", "--metric", "val_acc"], "--metric 'val_acc'"),
    (["{run}", "--x", "flops"], "--x 'flops'"), (["{run}", "--out", "{tmp}/no/runs.png"], "--out"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, args, culprit):
    with pytest.raises(SystemExit) as exit_info:
        compare.main([a.format(tmp=tmp_path, run=tiny_run) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and culprit in err[0]


def test_a_resumed_runs_time_continues_across_processes():
    lines = [{"iter": 0, "num_params": 5}, {"iter": 10, "elapsed_s": 3.0},
             {"iter": 10, "num_params": 5}, {"iter": 20, "elapsed_s": 2.0}, {"iter": 30, "elapsed_s": 4.5}]
    assert [r.get("time") for r in with_time(lines)] == [None, 3.0, None, 5.0, 7.5]


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason='tensorboard is not installed (pip install -e ".[tensorboard]")')
def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(one_eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(one_eval_run / "tensorboard"))
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected = {}
    for r in rows(one_eval_run):
        for key in SCALARS:
            # an evaluation line's train_loss is the interval's mean, already drawn step by step
            if r.get(key) is not None and not (key == "train_loss" and "val_loss" in r):
                expected.setdefault(key, {})[r["iter"]] = r[key]
    assert set(expected) >= {"train_loss", "val_loss", "val_bpb", "lr", "tokens_per_sec"}
    assert logged.keys() == expected.keys()
    for key, values in expected.items():
        assert logged[key] == pytest.approx(values, rel=1e-6), key


def test_tensorboard_without_the_package_says_which_extra_and_writes_nothing(tmp_path, monkeypatch):
    from common.errors import UserError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[tensorboard\]"'):
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    assert list(tmp_path.iterdir()) == []


def test_history_shows_n2_n4_the_best_order_and_says_why_a_family_is_missing(tmp_path, monkeypatch):
    """bench.history's table, with each run faked (the real ones train for minutes)."""
    import bench.history as history

    val_bpb = {1: 3.5, 2: 2.9, 3: 2.4, 4: 2.1, 5: 2.05, 6: 2.2, 7: 2.4, 8: 2.6}

    def fake_train(entry, budget):
        if entry.family != "ngram":
            entry.skipped = f"{entry.config} does not exist yet"
            return
        n = int(entry.name.removeprefix("ngram-"))
        entry.run = Run(entry.name, "ngram", with_time([{"iter": 0, "num_params": 1000 * n}, {
            "iter": 0, "val_loss": 0.7 * val_bpb[n], "val_bpb": val_bpb[n], "elapsed_s": 1.0, "tokens": 10}]))
        entry.sample = "ROMEO:\nsome | text"

    monkeypatch.setattr(history, "train", fake_train)
    history.main(["--only", "ngram,lstm", "--out", str(tmp_path)])
    table = [line for line in (tmp_path / "HISTORY.md").read_text().splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[:3] for row in table] == [
        ["| n-gram, n=2", "2k", "2.900"], ["| n-gram, n=4", "4k", "2.100"],
        ["| n-gram, best order on val: n=5", "5k", "2.050"], ["| LSTM", "-", "-"]]
    assert "skipped: configs/lstm.yaml does not exist yet" in table[3]
    assert "`ROMEO:↵some \\| text`" in table[0]  # one line, the pipe escaped
    assert (tmp_path / "history.png").is_file() == HAVE_MATPLOTLIB

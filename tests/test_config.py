import pytest
import yaml

from trainer.config import Config, load_config
from common.errors import UserError
from tests.conftest import REPO, run_py


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path))


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config(str(REPO / "configs/small.yaml"),
                      ["train.max_iters=200", "model.n_layer=2", "out_dir=out/test", "optim.lr=3e-4",
                       "model.bias=false", "data.input=a.txt"])
    assert cfg.train.max_iters == 200 and cfg.model.n_layer == 2 and cfg.out_dir == "out/test"
    assert cfg.optim.lr == 3e-4 and cfg.model.bias is False and cfg.data.input == ["a.txt"]


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(str(REPO / "configs/small.yaml"), ["model.n_layer=3"])
    again = Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("override, expected", [
    ("model.n_layers=2", "unknown key 'model.n_layers' (did you mean 'model.n_layer'?)"),
    ("n_layer=2", "did you mean 'model.n_layer'"),
    ("train.max_iter=5", "did you mean 'train.max_iters'"),
    ("model.n_layer=two", "model.n_layer must be an integer"),
    ("model.bias=3", "model.bias must be true or false"),
    ("model.n_embd=130", "model.n_embd=130 must be divisible by model.n_head"),
    ("model.block_size=0", "model.block_size=0 must be >= 1"),
    ("model.dropout=1.5", "model.dropout=1.5 must be in"),
    ("train.dtype=fp8", "train.dtype='fp8' is not one of"),
    ("train.attention=fast", "train.attention='fast' is not one of: auto, flash, cudnn, efficient, math"),
    ("optim.schedule=linear", "optim.schedule='linear' is not one of"),
    ("model.pos=alibi", "model.pos='alibi' is not one of"),
    ("dpo.nll=-1", "dpo.nll=-1.0 must be >= 0"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(UserError, match=None) as err:
        load_config(str(REPO / "configs/small.yaml"), [override])
    assert expected in str(err.value)


def test_unknown_key_in_file_is_named_with_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layers: 2\n")
    with pytest.raises(UserError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "'model.n_layers'" in str(err.value) and "model.n_layer" in str(err.value)


def test_malformed_yaml_reports_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  n_layer: 2\n  n_head: [4\ntrain:\n  max_iters: 3\n")
    with pytest.raises(UserError, match=r"broken.yaml line \d+: invalid YAML"):
        load_config(str(path))


@pytest.mark.parametrize("args, culprit", [
    (["configs/small.yaml", "model.n_layers=2"], "model.n_layers"),
    (["configs/small.yaml", "model.n_embd=130"], "model.n_embd"),
    (["configs/nope.yaml"], "configs/nope.yaml"),
])
def test_cli_errors_are_one_line_without_traceback(args, culprit, tmp_path):
    r = run_py("train.py", *args, f"out_dir={tmp_path / 'out'}" if len(args) > 1 else "out_dir=x")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists(), "a refused config must not create the run folder"

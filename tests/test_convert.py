"""Weights in and out (model/convert.py): Hugging Face import with logit parity, greedy generation
through sample.py, export round trips to transformers for every exportable option combination,
GGUF written and read back, init_from an imported model, tokenizer files, and bad inputs.

Offline: every model is a tiny random one built here, with weights large enough (unit-scale
matrices, norm gains and biases far from 1 and 0) that a swapped, untransposed or sign-flipped
tensor moves the logits by far more than the 1e-4 tolerance. transformers is imported once."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from common.errors import UserError  # noqa: E402
from data.hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer  # noqa: E402
from data.tokenizer import CharTokenizer, TiktokenTokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model import convert  # noqa: E402
from model.generate import TextStream  # noqa: E402
from model.gguf_export import gguf_tensors, read_gguf_tensors  # noqa: E402
from sample import main as sample_main  # noqa: E402
from tests.conftest import REPO, run_py  # noqa: E402
from trainer.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from trainer.config import Config, load_config  # noqa: E402

TEXT = ("Hello world!  It's 2026: 1234567 tokens, naïve café.\n\nПривет, мир! 你好，世界。 こんにちは 🤖🚀👩‍👩‍👧 "
        "مرحبا   \t tabs\r\n  trailing   \n\n\n  x's 'll  ")
CTX = 64


pytestmark = pytest.mark.usefixtures("one_thread_module")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Unit-scale weights: norm gains 1 +- 0.3, biases +- 0.3, matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(0.3 * noise if name.endswith("bias") else 1 + 0.3 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model.eval()


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out[0]


def save_run(folder: Path, cfg: GPTConfig, tokenizer, seed=0) -> GPT:
    """A run folder holding a random model: what export reads."""
    model = randomize(GPT(cfg), seed)
    folder.mkdir(parents=True)
    save_checkpoint({"model": model.state_dict(), "config": Config(model=cfg).to_dict(),
                     "tokenizer": tokenizer.state(), "iter": 0}, folder / "latest.pt")
    return model


def run_convert(*argv) -> tuple[int, str]:
    """(exit status, stderr) of `python -m model.convert ...`, in process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            convert.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# Fixtures: tokenizers and transformers models -------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    try:
        return TiktokenTokenizer.openai("gpt2")
    except UserError as e:
        pytest.skip(f"GPT-2's vocabulary is not cached: {e}")


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory) -> Path:
    """A byte-level BPE trained by the tokenizers library (not by this project), whose end of
    text is Llama-3's `<|end_of_text|>`: a folder with tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end_of_text|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = (REPO / "data/tinyshakespeare/input.txt").read_text()[:100_000]
    tok.train_from_iterator([corpus, TEXT * 5], trainer)
    folder = tmp_path_factory.mktemp("small_bpe")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    return folder


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory, gpt2_tokenizer):
    """(folder, model): a GPT2LMHeadModel with GPT-2's vocabulary files."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=CTX, vocab_size=50257, layer_norm_epsilon=1e-5))
    randomize(model, 1)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder)
    write_hf_tokenizer(gpt2_tokenizer, folder, CTX)
    return folder, model


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, small_bpe):
    """(folder, model): a LlamaForCausalLM with grouped-query attention, an untied head, non-default
    epsilon and rope_theta, and the tokenizers-trained BPE."""
    vocab = json.loads((small_bpe / "tokenizer.json").read_text())["model"]["vocab"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CTX, rms_norm_eps=1e-5, rope_theta=50_000.0,
        tie_word_embeddings=False, eos_token_id=0))
    randomize(model, 2)
    folder = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_text((small_bpe / f).read_text())
    return folder, model


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_gpt2, hf_llama):
    """Both transformers models imported into run folders: {name: (run folder, hf model, hf folder)}."""
    root = tmp_path_factory.mktemp("imported")
    runs = {}
    for name, (folder, model) in (("gpt2", hf_gpt2), ("llama", hf_llama)):
        code, err = run_convert("import", folder, "--out", root / name)
        assert code == 0, err
        runs[name] = (root / name, model, folder)
    return runs


# Import ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_import_matches_transformers_logits(imported, name):
    run, hf, _ = imported[name]
    model, tokenizer, cfg, _ = load_model(run)
    vocab = hf.config.vocab_size
    eot, last = tokenizer.eot_id, vocab - 1
    x = torch.tensor([[eot, 5, last, 17, 3, eot, 100, last, 42, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    ours, theirs = logits_of(model, x)[..., :vocab], logits_of(hf, x)
    assert theirs.abs().max() > 1  # logits far apart: a wrong tensor would show
    assert (ours - theirs).abs().max() < 1e-4
    m = cfg.model
    if name == "gpt2":
        assert (m.mlp, m.pos, m.norm, m.tie_weights, tokenizer.name, eot) == ("gelu_tanh", "learned", "layernorm",
                                                                            True, "gpt2", 50256)
    else:
        assert (m.mlp, m.pos, m.rope_base, m.norm_eps, m.n_kv_head, m.tie_weights) == ("swiglu", "rope", 50_000.0,
                                                                                     1e-5, 2, False)
        assert tokenizer.eot == "<|end_of_text|>" and eot == 0


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_sample_py_equals_transformers_generate(imported, name, capsys):
    run, hf, _ = imported[name]
    _, tokenizer, _, _ = load_model(run)
    prompt = "Hello, wörld"
    ids = torch.tensor([tokenizer.encode(prompt)])
    sample_main(["--ckpt", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "30",
                 "--device", "cpu", "--dtype", "float32"])
    ours = capsys.readouterr().out
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=tokenizer.eot_id,
                          pad_token_id=tokenizer.eot_id)
    stream = TextStream(tokenizer)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eot_id]
    theirs = prompt + "".join(stream.feed(t) for t in new) + stream.close() + "\n"
    assert len(new) >= 10  # a real comparison, not two empty continuations
    assert ours == theirs


# Export round trips --------------------------------------------------------------------------------------

CLASSIC = [dict(mlp=mlp, bias=bias, tie_weights=tie) for mlp in ("gelu", "gelu_tanh") for bias in (True, False)
           for tie in (True, False)]
LLAMA = [dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=kv, bias=bias, tie_weights=tie, norm_eps=1e-5,
              rope_base=50_000.0) for kv in (0, 2) for bias in (True, False) for tie in (True, False)]
QWEN3 = [dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=kv, bias=False, tie_weights=tie)
         for kv in (0, 2) for tie in (True, False)]
COMBOS = {"-".join(f"{k}={v}" for k, v in c.items() if k in ("mlp", "bias", "tie_weights", "n_kv_head", "qk_norm")): c
          for c in CLASSIC + LLAMA + QWEN3}


@pytest.fixture(scope="module")
def char_tokenizer():
    return CharTokenizer.from_text(TEXT, separator="\x03")


@pytest.mark.parametrize("combo", list(COMBOS))
def test_export_round_trip(combo, char_tokenizer, tmp_path):
    """run -> export -> transformers gives our logits; importing the export gives our weights."""
    cfg = GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=CTX, n_layer=2, n_head=4, n_embd=64,
                    **COMBOS[combo])
    ours = save_run(tmp_path / "run", cfg, char_tokenizer)
    code, err = run_convert("export", tmp_path / "run", "--out", tmp_path / "hf")
    assert code == 0, err
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = {"learned": "GPT2LMHeadModel", "rope": "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"}
    assert type(theirs).__name__ == expected[cfg.pos]
    x = torch.tensor([[char_tokenizer.eot_id, 3, cfg.vocab_size - 1, 9, 0, 11, 40, 2]])
    assert (logits_of(ours, x) - logits_of(theirs, x)).abs().max() < 1e-4
    code, err = run_convert("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0, err
    back = load_checkpoint(tmp_path / "back" / "latest.pt")
    assert back["tokenizer"] == char_tokenizer.state()
    for name, t in ours.state_dict().items():
        assert torch.equal(back["model"][name], t), name


def test_export_dtypes_and_overwrite(imported, tmp_path):
    run, hf, _ = imported["llama"]
    x = torch.tensor([[0, 5, 399, 17, 3, 0, 100, 42]])
    code, err = run_convert("export", run, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    diff = (logits_of(half, x) - logits_of(hf, x)).abs().max()
    assert 1e-4 < diff < 0.2  # rounded to bfloat16, not broken
    code, err = run_convert("export", run, "--out", tmp_path / "bf16")
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    code, err = run_convert("export", run, "--out", tmp_path / "bf16", "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no temporary left behind


# GGUF -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gguf_written_read_back_and_loaded_by_transformers(arch, small_bpe, tmp_path):
    tokenizer = read_hf_tokenizer(small_bpe)
    options = (dict(mlp="gelu_tanh", tie_weights=False) if arch == "gpt2" else
               dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, rope_base=50_000.0))
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=CTX, n_layer=2, n_head=4, n_embd=64, **options)
    ours = save_run(tmp_path / "run", cfg, tokenizer, seed=3)
    expected = gguf_tensors(cfg, ours.state_dict(), tokenizer.vocab_size, arch)
    x = torch.tensor([[tokenizer.eot_id, 5, tokenizer.vocab_size - 1, 17, 3, 250, 100, 42]])
    for dtype, tolerance in (("float32", 1e-4), ("float16", 0.05), ("bfloat16", 0.3), ("q8_0", 0.5)):
        path = tmp_path / f"{arch}-{dtype}.gguf"
        code, err = run_convert("export", tmp_path / "run", "--out", path, "--format", "gguf", "--dtype", dtype)
        assert code == 0, err
        read = read_gguf_tensors(path)
        assert read.keys() == expected.keys()
        for name, t in expected.items():
            want = t.float().numpy()
            if dtype == "q8_0" and t.dim() == 2 and name != "position_embd.weight":
                q8 = gguf.GGMLQuantizationType.Q8_0
                want = gguf.dequantize(gguf.quantize(want, q8), q8).reshape(want.shape)
            elif dtype in ("float16", "bfloat16") and t.dim() == 2 and name != "position_embd.weight":
                want = t.to(getattr(torch, dtype)).float().numpy()
            assert read[name].shape == want.shape and (read[name] == want).all(), (dtype, name)
        if dtype in ("float32", "q8_0"):
            # transformers reads gpt2.context_length into n_ctx, not n_positions: say it
            extra = {"n_positions": CTX} if arch == "gpt2" else {}
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, **extra).eval()
            assert (logits_of(ours, x) - logits_of(theirs, x)).abs().max() < tolerance
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"{arch}-float32.gguf")
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)


# init_from -------------------------------------------------------------------------------------------------


def test_init_from_imported_run_trains_then_samples(imported, tiny_corpus, tmp_path, capsys):
    run, _, _ = imported["llama"]
    out = tmp_path / "ft"
    r = run_py("train.py", "configs/finetune.yaml", f"init_from={run}", f"out_dir={out}", f"data.input={tiny_corpus}",
               f"data.prepared_dir={tmp_path / 'prep'}", "train.batch_size=4", "train.grad_accum=1",
               "train.max_iters=20", "train.eval_interval=20", "train.eval_batches=1", "train.log_interval=5",
               "train.device=cpu", "model.dropout=0.0")
    assert r.returncode == 0, r.stderr
    base, tuned = load_checkpoint(run / "latest.pt"), load_checkpoint(out / "latest.pt")
    assert tuned["iter"] == 20 and tuned["tokenizer"] == base["tokenizer"]
    assert tuned["config"]["model"]["n_kv_head"] == 2 and tuned["config"]["model"]["rope_base"] == 50_000.0
    # Fine-tuned from the imported weights, not from a fresh initialisation.
    before, after = base["model"]["blocks.0.attn.c_attn.weight"], tuned["model"]["blocks.0.attn.c_attn.weight"]
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.9
    sample_main(["--ckpt", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "10", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_init_from_hf_folder_is_the_imported_run(imported):
    from trainer.init import load_init

    run, _, folder = imported["llama"]
    base = load_checkpoint(run / "latest.pt")
    init = load_init(load_config(None, [f"init_from={folder}", "model.dropout=0.1"]))
    assert init.tokenizer.state() == base["tokenizer"] and init.model_cfg.dropout == 0.1
    assert init.model_cfg.vocab_size == 400  # vocabularies under 1024 are not padded
    for name, t in base["model"].items():
        assert torch.equal(init.state[name], t), name


def test_resume_of_an_imported_run_says_to_use_init_from(imported):
    import train

    run, _, _ = imported["gpt2"]
    with pytest.raises(UserError, match="no training state to resume; start a run from it with init_from="):
        train.train(load_config(str(REPO / "configs/small.yaml"), [f"out_dir={run}", "resume=true",
                                                                    "train.device=cpu"]))


# Tokenizer files ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_bpe():
    return TiktokenTokenizer.train([(REPO / "data/tinyshakespeare/input.txt").read_text()[:100_000], TEXT], 500)


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char", "imported"])
def test_tokenizer_files_give_the_same_ids(kind, tmp_path, hf_gpt2, gpt2_tokenizer, project_bpe, char_tokenizer,
                                           small_bpe):
    """Each tokenizer kind written as Hugging Face files (GPT-2's: vocab.json + merges.txt, the
    others: tokenizer.json; the hf_gpt2 fixture wrote GPT-2's) encodes as the checkpoint's does.
    cl100k_base, the same regex as the project's BPE at 100k tokens, is checked by bench/convert.py."""
    tok = {"gpt2": gpt2_tokenizer, "bpe": project_bpe, "char": char_tokenizer,
           "imported": read_hf_tokenizer(small_bpe)}[kind]
    if kind == "gpt2":
        tmp_path = hf_gpt2[0]
        assert (tmp_path / "merges.txt").is_file() and not (tmp_path / "tokenizer.json").exists()
    else:
        assert write_hf_tokenizer(tok, tmp_path, CTX) == ["tokenizer_config.json", "tokenizer.json"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode(TEXT)
    assert hf.encode(TEXT, add_special_tokens=False) == ids
    assert hf.decode(ids) == TEXT
    assert read_hf_tokenizer(tmp_path).encode(TEXT) == ids  # and back
    if kind == "imported":  # the library that trained it agrees with the conversion
        assert tokenizers.Tokenizer.from_file(str(small_bpe / "tokenizer.json")).encode(TEXT).ids == ids


# Bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    ("wordpiece", "a WordPiece tokenizer"),
    ("byte_fallback", "SentencePiece/WordPiece-style"),
    ("normalizer", "normalises text first (NFC)"),
    ("metaspace", "pre_tokenizer Metaspace"),
    ("merge_order", "merges are not in the order of the ids"),
    ("missing_byte", "of the 256 byte tokens are missing"),
])
def test_unconvertible_tokenizers_are_refused(change, words, small_bpe, tmp_path):
    data = json.loads((small_bpe / "tokenizer.json").read_text())
    model = data["model"]
    if change == "wordpiece":
        model["type"] = "WordPiece"
    elif change == "byte_fallback":
        model["byte_fallback"] = True
    elif change == "normalizer":
        data["normalizer"] = {"type": "NFC"}
    elif change == "metaspace":
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}
    elif change == "merge_order":
        model["merges"][3], model["merges"][4] = model["merges"][4], model["merges"][3]
    else:
        del model["vocab"]["Ā"]  # byte 0 in the byte-level alphabet
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_hf_tokenizer(tmp_path)



def test_pickled_code_is_refused_and_never_runs(tmp_path, hf_gpt2):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((hf_gpt2[0] / "config.json").read_text())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"transformer.wte.weight": torch.zeros(1), "x": Payload()}, folder / "pytorch_model.bin")
    code, err = run_convert("import", folder, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "pytorch_model.bin", "refused")
    assert not marker.exists() and not (tmp_path / "out").exists()
    pickle.loads(pickle.dumps(Payload()))  # the payload is live: plain unpickling runs it
    assert marker.exists()


def bad_import_cases(root: Path, hf_gpt2_folder: Path) -> dict:
    """name -> (folder, words the error names)."""
    def folder(name, config=None, weights=True):
        f = root / name
        f.mkdir(parents=True)
        if config is not None:
            (f / "config.json").write_text(json.dumps(config))
        if weights:
            (f / "model.safetensors").write_bytes((hf_gpt2_folder / "model.safetensors").read_bytes())
        for t in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (f / t).write_text((hf_gpt2_folder / t).read_text())
        return f

    good = json.loads((hf_gpt2_folder / "config.json").read_text())
    return {
        "no-config": (folder("no-config"), ["no config.json"]),
        "no-weights": (folder("no-weights", good, weights=False), ["no weights"]),
        "model-type": (folder("model-type", {**good, "model_type": "bert"}), ["model_type 'bert'"]),
        "shapes": (folder("shapes", {**good, "n_embd": 32}), ["shape", "config.json implies"]),
        "activation": (folder("activation", {**good, "activation_function": "relu"}), ["activation_function='relu'"]),
    }


def test_bad_imports_are_one_line_and_write_nothing(tmp_path, hf_gpt2):
    for name, (source, words) in bad_import_cases(tmp_path / "src", hf_gpt2[0]).items():
        out = tmp_path / "out" / name
        out.parent.mkdir(exist_ok=True)
        code, err = run_convert("import", source, "--out", out)
        assert_one_line_error(code, err, *words)
        assert list(out.parent.iterdir()) == [], name


def test_rope_scaling_is_refused_by_name(hf_llama, tmp_path):
    folder, _ = hf_llama
    bad = tmp_path / "scaled"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (bad / "config.json").write_text(json.dumps(config))
    code, err = run_convert("import", bad, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "rope_scaling of type 'llama3'")


def test_bad_exports_are_one_line_and_write_nothing(tmp_path, char_tokenizer, monkeypatch):
    base = dict(vocab_size=char_tokenizer.vocab_size, block_size=CTX, n_layer=1, n_head=2, n_embd=32)
    refusals = {
        "model.mlp=relu2": dict(pos="rope", norm="rmsnorm", mlp="relu2"),
        "model.logit_softcap=5.0": dict(logit_softcap=5.0),
        "model.norm=rmsnorm": dict(norm="rmsnorm"),
        "model.n_kv_head=1": dict(n_kv_head=1),
        "model.qk_norm=true": dict(qk_norm=True),
        "model.norm=layernorm": dict(pos="rope", mlp="swiglu"),
        "model.bias=true": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
    }
    for i, (words, options) in enumerate(refusals.items()):
        save_run(tmp_path / f"run{i}", GPTConfig(**base, **options), char_tokenizer)
        code, err = run_convert("export", tmp_path / f"run{i}", "--out", tmp_path / "out")
        assert_one_line_error(code, err, words, "no transformers equivalent")
    save_run(tmp_path / "classic", GPTConfig(**base), char_tokenizer)
    for args, words in ((["--dtype", "q8_0"], ["q8_0", "--format hf"]),
                        (["--format", "gguf"], ["*.gguf"]),
                        (["--format", "onnx"], ["--format onnx"])):
        assert_one_line_error(*run_convert("export", tmp_path / "classic", "--out", tmp_path / "out", *args), *words)
    # the char tokenizer has no GGUF form; another family has no export at all
    assert_one_line_error(*run_convert("export", tmp_path / "classic", "--out", tmp_path / "m.gguf",
                                       "--format", "gguf"), "char tokenizer")
    ckpt = load_checkpoint(tmp_path / "classic" / "latest.pt")
    ckpt["config"]["model"]["arch"] = "lstm"
    save_checkpoint(ckpt, tmp_path / "lstm.pt")
    assert_one_line_error(*run_convert("export", tmp_path / "lstm.pt", "--out", tmp_path / "out"),
                          "model.arch=lstm")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the [hf] extra missing
    assert_one_line_error(*run_convert("export", tmp_path / "classic", "--out", tmp_path / "out"),
                          "safetensors", "pip install")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_hf_name_offline_says_how_to_pre_download(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    code, err = run_convert("import", "hf:someone/tiny-gpt2", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "hf:someone/tiny-gpt2", "--local-dir")
    assert not (tmp_path / "out").exists()

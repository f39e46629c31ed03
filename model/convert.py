"""Weights in and out: a Hugging Face model as a run folder, a run as a Hugging Face folder or GGUF.

    python -m model.convert import SOURCE --out RUN_DIR [--overwrite]
    python -m model.convert export RUN_DIR --out PATH [--format hf|gguf]
                                   [--dtype float32|bfloat16|float16|q8_0] [--overwrite]

SOURCE is a local Hugging Face model folder (config.json, model.safetensors or pytorch_model.bin,
possibly sharded with an index, and its tokenizer files) or `hf:NAME`, downloaded with
huggingface_hub. RUN_DIR then holds a normal run: latest.pt (weights, resolved config,
tokenizer, iteration 0) and config.yaml, which sample.py reads and `train.py init_from=RUN_DIR`
fine-tunes (train.py also takes `init_from=HF_FOLDER` or `init_from=hf:NAME` directly, through
`imported_checkpoint`). Export writes a folder transformers loads offline (--format hf) or one
.gguf file (--format gguf); the mappings live in model/hf.py, model/gguf_export.py and
data/hf_tokenizer.py.

Design decisions:
- Only the GPT family converts (model.arch=gpt); the others are refused by name.
- Nothing is half-written: the output is built under a temporary name beside the target and
  renamed into place when complete; an existing target is refused unless --overwrite, and even
  then replaced only once the new one is complete.
- Weights are read without running code: safetensors, or torch.load(weights_only=True), which
  refuses a pickle that names any callable instead of calling it.
- An export reads only the checkpoint's weights (memory-mapped), never its optimizer state, and
  writes float32 by default so that the logits are reproduced exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from common.errors import UserError, report_user_errors

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require(module: str, purpose: str):
    """Import an optional dependency, or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the {module} package: pip install -e \".[hf]\"") from None


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face model


def is_hf_source(source: str) -> bool:
    """hf:NAME, or a folder with a config.json and no checkpoint of ours."""
    path = Path(source)
    return source.startswith("hf:") or (path.is_dir() and (path / "config.json").is_file()
                                        and not any((path / n).is_file() for n in ("latest.pt", "best.pt")))


def download(name: str) -> Path:
    """The model folder of hf:NAME, from huggingface_hub's cache or the network."""
    offline = (f"or download it where there is network with `hf download {name} --local-dir DIR` (older "
               f"huggingface_hub: huggingface-cli download), copy DIR here and pass DIR instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"hf:{name} needs huggingface_hub (pip install -e \".[hf]\"), {offline}") from None
    files = ["config.json", "generation_config.json", "tokenizer*", "vocab.json", "merges.txt"]
    try:
        folder = Path(snapshot_download(name, allow_patterns=files + ["model*.safetensors*"]))
        if not any((folder / f).is_file() for f in WEIGHT_FILES):
            folder = Path(snapshot_download(name, allow_patterns=files + ["pytorch_model*.bin*"]))
    except Exception as e:  # network, authentication, unknown repository: many exception types
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"hf:{name}: could not download it ({type(e).__name__}: {reason}); {offline}") from None
    return folder


class SafetensorsFiles(Mapping):
    """The tensors of one or more .safetensors files, each read when asked for."""

    def __init__(self, files: list[Path]):
        safetensors = require("safetensors", "reading model.safetensors")
        self.owner = {}
        for f in files:
            try:
                handle = safetensors.safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error type for a corrupt header
                raise UserError(f"{f}: not a readable safetensors file ({str(e)[:120]})") from None
            self.owner.update({k: handle for k in handle.keys()})

    def __getitem__(self, key):
        return self.owner[key].get_tensor(key)

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        return iter(self.owner)

    def __len__(self):
        return len(self.owner)


def load_pickled_weights(path: Path) -> dict:
    """A pytorch_model.bin's tensors, loaded weights-only: a pickle naming any callable is refused
    before anything in it runs."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the pre-zip format cannot be mapped
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise UserError(f"{path}: refused: it holds pickled objects, not only tensors ({culprit[:160]}); "
                        f"nothing in it was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def read_weights(folder: Path) -> Mapping[str, torch.Tensor]:
    for index, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{folder / index}: not a weight index (no weight_map)") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"{folder}: shard {missing[0]} named by {index} is missing")
            if kind == "st":
                return SafetensorsFiles([folder / s for s in shards])
            return {k: v for s in shards for k, v in load_pickled_weights(folder / s).items()}
    if (folder / "model.safetensors").is_file():
        return SafetensorsFiles([folder / "model.safetensors"])
    if (folder / "pytorch_model.bin").is_file():
        return load_pickled_weights(folder / "pytorch_model.bin")
    raise UserError(f"{folder}: no weights (expected model.safetensors or pytorch_model.bin)")


def imported_checkpoint(source: str) -> dict:
    """A Hugging Face model (folder or hf:NAME) as the checkpoint dict a run folder holds."""
    from data.hf_tokenizer import read_hf_tokenizer
    from model.hf import gpt_from_hf
    from trainer.config import Config, DataConfig

    folder = download(source[3:]) if source.startswith("hf:") else Path(source)
    if not folder.is_dir():
        raise UserError(f"{source}: no such folder (expected a Hugging Face model folder or hf:NAME)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json, not a Hugging Face model folder")
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise UserError(f"{folder / 'config.json'}: not readable JSON ({str(e)[:120]})") from None
    model_cfg, state = gpt_from_hf(hf_config, read_weights(folder), str(folder))
    eos = hf_config.get("eos_token_id")
    tokenizer = read_hf_tokenizer(folder, eos[0] if isinstance(eos, list) and eos else eos)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_cfg.vocab_size} rows")
    name = tokenizer.name if tokenizer.name in ("char", "gpt2", "cl100k_base") else "bpe"  # the nearest config name
    config = Config(model=model_cfg, data=DataConfig(tokenizer=name), out_dir="")
    return {"model": state, "config": config.to_dict(), "tokenizer": tokenizer.state(), "iter": 0,
            "converted_from": source}


# ---------------------------------------------------------------------------------------------
# Publishing an output atomically


def check_target(out: Path, overwrite: bool):
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder")


def publish(tmp: Path, out: Path):
    """Move the complete tmp (a file or folder) to out, replacing what is there."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


class Staging:
    """A temporary path beside `out`, removed unless the block finishes (then renamed to out)."""

    def __init__(self, out: Path, folder: bool):
        self.out, self.folder = out, folder
        self.tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        self._remove()
        if self.folder:
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, error, tb):
        if kind is None:
            publish(self.tmp, self.out)
        else:
            self._remove()
        return False

    def _remove(self):
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp)
        elif self.tmp.exists():
            self.tmp.unlink()


# ---------------------------------------------------------------------------------------------
# The commands


def import_model(source: str, out: Path, overwrite: bool = False):
    import yaml

    from common.files import atomic_write
    from trainer.checkpoint import LATEST, save_checkpoint

    check_target(out, overwrite)
    ckpt = imported_checkpoint(source)
    ckpt["config"]["out_dir"] = str(out)
    with Staging(out, folder=True) as tmp:
        save_checkpoint(ckpt, tmp / LATEST)
        atomic_write(tmp / "config.yaml", yaml.safe_dump(ckpt["config"], sort_keys=False))
    cfg = ckpt["config"]["model"]
    n = sum(t.numel() for k, t in ckpt["model"].items() if k != "lm_head.weight" or not cfg["tie_weights"])
    print(f"imported {source}: {n / 1e6:.2f}M parameters, {cfg['n_layer']} layers, {cfg['n_embd']} wide, "
          f"vocabulary {cfg['vocab_size']}, tokenizer {ckpt['config']['data']['tokenizer']} -> {out}", file=sys.stderr)


def load_run(run: str):
    """(GPTConfig, weights, tokenizer) of a run folder or checkpoint file; weights only."""
    from data.tokenizer import from_state
    from trainer.checkpoint import find_checkpoint, load_checkpoint
    from trainer.config import Config

    path = find_checkpoint(run)
    ckpt = load_checkpoint(path, mmap=True)
    arch = ckpt["config"].get("model", {}).get("arch", "gpt")
    if arch != "gpt":
        raise UserError(f"{path}: model.arch={arch} has no Hugging Face or GGUF export (only the gpt family converts)")
    cfg = Config.from_dict(ckpt["config"], source=f"{path} (config)").model
    return cfg, ckpt["model"], from_state(ckpt["tokenizer"]), path


def export_hf(cfg, state, tokenizer, folder: Path, dtype: str):
    from data.hf_tokenizer import write_hf_tokenizer
    from model.hf import hf_from_gpt

    safetensors_torch = require("safetensors.torch", "--format hf")
    config, tensors = hf_from_gpt(cfg, state, tokenizer.vocab_size, tokenizer.eot_id)
    tensors = {k: t.to(DTYPES[dtype]).contiguous() for k, t in tensors.items()}
    storages = set()
    for k, t in tensors.items():  # safetensors refuses tensors sharing memory (q, k, v split from c_attn)
        if t.untyped_storage().data_ptr() in storages:
            tensors[k] = t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"do_sample": False} | ({"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
                                         if tokenizer.eot_id is not None else {})
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_hf_tokenizer(tokenizer, folder, cfg.block_size)


def export_gguf(cfg, state, tokenizer, path: Path, dtype: str, name: str):
    require("gguf", "--format gguf")
    from data.hf_tokenizer import check_gguf_tokenizer
    from model.gguf_export import gguf_architecture, write_gguf

    gguf_architecture(cfg)  # refuse before writing anything
    check_gguf_tokenizer(tokenizer)
    write_gguf(cfg, state, tokenizer, path, dtype, name)
    if cfg.mlp == "gelu":
        print("note: model.mlp=gelu (exact GELU); llama.cpp's GPT-2 uses the tanh approximation, so its logits "
              "differ slightly (bench/RESULTS.md)", file=sys.stderr)


def export_model(run: str, out: Path, fmt: str = "hf", dtype: str = "float32", overwrite: bool = False):
    if fmt not in ("hf", "gguf"):
        raise UserError(f"--format {fmt} is not one of: hf, gguf")
    allowed = ("float32", "bfloat16", "float16", "q8_0") if fmt == "gguf" else tuple(DTYPES)
    if dtype not in allowed:
        raise UserError(f"--dtype {dtype} is not one of: {', '.join(allowed)} (for --format {fmt})")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF export is one file named *.gguf")
    check_target(out, overwrite)
    cfg, state, tokenizer, path = load_run(run)
    with torch.no_grad(), Staging(out, folder=fmt == "hf") as tmp:
        if fmt == "hf":
            export_hf(cfg, state, tokenizer, tmp, dtype)
        else:
            export_gguf(cfg, state, tokenizer, tmp, dtype, Path(run).name)
    print(f"exported {path} as {fmt} ({dtype}) -> {out}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    commands = ap.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a Hugging Face model (folder or hf:NAME) -> a run folder")
    imp.add_argument("source", help="a Hugging Face model folder, or hf:NAME to download")
    exp = commands.add_parser("export", help="a run folder or checkpoint -> a Hugging Face folder or a .gguf file")
    exp.add_argument("run", help="a run folder (its best.pt, else latest.pt) or a checkpoint file")
    exp.add_argument("--format", default="hf", help="hf (a transformers folder) | gguf (one .gguf file)")
    exp.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | q8_0 (gguf only)")
    for sub in (imp, exp):
        sub.add_argument("--out", required=True, help="the run folder to write (import); the folder or .gguf file "
                                                      "to write (export)")
        sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        sub.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = ap.parse_args(argv)
    with report_user_errors(args.debug):
        if args.command == "import":
            import_model(args.source, Path(args.out), args.overwrite)
        else:
            export_model(args.run, Path(args.out), args.format, args.dtype, args.overwrite)


if __name__ == "__main__":
    main()

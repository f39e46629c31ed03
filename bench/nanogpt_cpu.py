"""nanoGPT's documented CPU run, re-implemented in one file: the baseline of bench/race.py.

    python nanogpt_cpu.py prepare      # nanoGPT: python data/shakespeare_char/prepare.py
    python nanogpt_cpu.py train        # nanoGPT: python train.py config/train_shakespeare_char.py --device=cpu
                                       #   --compile=False --eval_iters=20 --log_interval=1 --block_size=64
                                       #   --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
                                       #   --lr_decay_iters=2000 --dropout=0.0

Run in a folder holding `input.txt` (Tiny Shakespeare); it writes `train.bin`, `val.bin`,
`meta.pkl` and `out-shakespeare-char/ckpt.pt` there. nanoGPT itself is not vendored; this file
follows its data/shakespeare_char/prepare.py, train.py and model.py (karpathy/nanoGPT, master)
step for step with the command's settings, so that its wall time is what that command costs:
- prepare: read the text, sorted character vocabulary, first 90% train / last 10% val, uint16
  .bin files and a pickled meta (the download is skipped: input.txt is given, as when it exists);
- train: the same imports (DDP and the process-group functions included), `torch.manual_seed(1337)`,
  the model (bias-free LayerNorm and Linear, SDPA causal attention, GELU MLP, tied head,
  N(0, 0.02) init with the residual projections scaled by 1/sqrt(2 * n_layer)), AdamW from
  `configure_optimizers` (2-D weights decayed, the rest not, not fused on CPU), a fresh
  np.memmap and torch.stack per batch, the next batch fetched between forward and backward,
  warmup + cosine lr, clipping at 1.0 (after a GradScaler's unscale: float16 is the default
  dtype without CUDA, and the scaler then disables itself), `loss.item()`
  and a printed line with the MFU estimate every iteration, and at iterations 0, 250, ...,
  2000 an estimate of the train and val loss over 20 random batches each, saving `ckpt.pt`
  (model, optimizer, model args, config) when the val loss improves. Iterations 0..2000: 2,001
  optimizer steps, as nanoGPT's loop runs until iter_num > max_iters.
"""

import math
import os
import pickle
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.distributed import destroy_process_group, init_process_group  # noqa: F401 (nanoGPT imports them)
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: F401

# The documented command's configuration (config/train_shakespeare_char.py + the overrides).
CONFIG = dict(out_dir="out-shakespeare-char", eval_interval=250, log_interval=1, eval_iters=20, eval_only=False,
              always_save_checkpoint=False, gradient_accumulation_steps=1, batch_size=12, block_size=64,
              n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False, learning_rate=1e-3, max_iters=2000,
              weight_decay=1e-1, beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True, warmup_iters=100,
              lr_decay_iters=2000, min_lr=1e-4, device="cpu", compile=False,
              dtype="bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16")


def prepare():
    try:
        import requests  # noqa: F401 (prepare.py imports it for the download)
    except ImportError:
        pass
    with open("input.txt") as f:
        data = f.read()
    print(f"length of dataset in characters: {len(data):,}")
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    print("all the unique characters:", "".join(chars))
    print(f"vocab size: {vocab_size:,}")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    train_ids = [stoi[c] for c in data[:int(n * 0.9)]]
    val_ids = [stoi[c] for c in data[int(n * 0.9):]]
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")
    np.array(train_ids, dtype=np.uint16).tofile("train.bin")
    np.array(val_ids, dtype=np.uint16).tofile("val.bin")
    with open("meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab_size, "itos": itos, "stoi": stoi}, f)


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c["n_embd"], 3 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(c["n_embd"], c["n_embd"], bias=c["bias"])
        self.attn_dropout = nn.Dropout(c["dropout"])
        self.resid_dropout = nn.Dropout(c["dropout"])
        self.n_head, self.n_embd, self.dropout = c["n_head"], c["n_embd"], c["dropout"]

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c["n_embd"], 4 * c["n_embd"], bias=c["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c["n_embd"], c["n_embd"], bias=c["bias"])
        self.dropout = nn.Dropout(c["dropout"])

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = LayerNorm(c["n_embd"], bias=c["bias"])
        self.attn = CausalSelfAttention(c)
        self.ln_2 = LayerNorm(c["n_embd"], bias=c["bias"])
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c["vocab_size"], c["n_embd"]), wpe=nn.Embedding(c["block_size"], c["n_embd"]),
            drop=nn.Dropout(c["dropout"]), h=nn.ModuleList([Block(c) for _ in range(c["n_layer"])]),
            ln_f=LayerNorm(c["n_embd"], bias=c["bias"])))
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c["n_layer"]))
        print("number of parameters: %.2fM" % (self.get_num_params() / 1e6,))

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for p in param_dict.values() if p.dim() >= 2]
        nodecay_params = [p for p in param_dict.values() if p.dim() < 2]
        groups = [{"params": decay_params, "weight_decay": weight_decay},
                  {"params": nodecay_params, "weight_decay": 0.0}]
        print(f"num decayed parameter tensors: {len(decay_params)}, with "
              f"{sum(p.numel() for p in decay_params):,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with "
              f"{sum(p.numel() for p in nodecay_params):,} parameters")
        use_fused = device_type == "cuda"
        print(f"using fused AdamW: {use_fused}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if use_fused else {}))

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        c = self.config
        L, H, Q, T = c["n_layer"], c["n_head"], c["n_embd"] // c["n_head"], c["block_size"]
        flops_per_iter = (6 * self.get_num_params() + 12 * L * H * Q * T) * T * fwdbwd_per_iter
        return flops_per_iter * (1.0 / dt) / 312e12


def train():
    c = dict(CONFIG)
    print(f"tokens per iteration will be: {c['gradient_accumulation_steps'] * c['batch_size'] * c['block_size']:,}")
    os.makedirs(c["out_dir"], exist_ok=True)
    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device_type = "cpu"
    ctx = nullcontext()
    block_size, batch_size = c["block_size"], c["batch_size"]

    def get_batch(split):
        data = np.memmap("train.bin" if split == "train" else "val.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
        return x.to(c["device"]), y.to(c["device"])

    iter_num, best_val_loss = 0, 1e9
    with open("meta.pkl", "rb") as f:
        meta_vocab_size = pickle.load(f)["vocab_size"]
    print(f"found vocab_size = {meta_vocab_size} (inside meta.pkl)")
    model_args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=block_size,
                      bias=c["bias"], vocab_size=meta_vocab_size, dropout=c["dropout"])
    print("Initializing a new model from scratch")
    model = GPT(model_args)
    model.to(c["device"])
    scaler = torch.amp.GradScaler("cuda", enabled=(c["dtype"] == "float16"))  # without CUDA it disables itself
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                           device_type)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(c["eval_iters"])
            for k in range(c["eval_iters"]):
                X, Y = get_batch(split)
                with ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    def get_lr(it):
        if it < c["warmup_iters"]:
            return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
        if it > c["lr_decay_iters"]:
            return c["min_lr"]
        decay_ratio = (it - c["warmup_iters"]) / (c["lr_decay_iters"] - c["warmup_iters"])
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return c["min_lr"] + coeff * (c["learning_rate"] - c["min_lr"])

    X, Y = get_batch("train")
    t0 = time.time()
    local_iter_num, running_mfu = 0, -1.0
    while True:
        lr = get_lr(iter_num) if c["decay_lr"] else c["learning_rate"]
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % c["eval_interval"] == 0:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val_loss or c["always_save_checkpoint"]:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "model_args": model_args, "iter_num": iter_num, "best_val_loss": best_val_loss,
                                  "config": c}
                    print(f"saving checkpoint to {c['out_dir']}")
                    torch.save(checkpoint, os.path.join(c["out_dir"], "ckpt.pt"))
        for micro_step in range(c["gradient_accumulation_steps"]):
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / c["gradient_accumulation_steps"]
            X, Y = get_batch("train")
            scaler.scale(loss).backward()
        if c["grad_clip"] != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % c["log_interval"] == 0:
            lossf = loss.item() * c["gradient_accumulation_steps"]
            if local_iter_num >= 5:
                mfu = model.estimate_mfu(batch_size * c["gradient_accumulation_steps"], dt)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {running_mfu * 100:.2f}%")
        iter_num += 1
        local_iter_num += 1
        if iter_num > c["max_iters"]:
            break


if __name__ == "__main__":
    {"prepare": prepare, "train": train}[sys.argv[1]]()

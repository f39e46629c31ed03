"""Fine-tuning: the token-weighted step loss, LoRA, evaluate.py's scoring, and a tiny SFT run
end to end (LoRA from a char base that lacks chat tokens: merge, the REPL over a pipe, plain
continuation, evaluate.py)."""

import copy
import io
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import evaluate
import sample
import train
from chat.tasks import generate as make_task
from chat.template import ChatTemplate
from common.errors import UserError
from data.tokenizer import CharTokenizer, with_chat_tokens
from model import IGNORE, GPT, GPTConfig
from model.convert import load_run, main as convert_main
from model.lora import add_adapters
from tests.conftest import run_py
from trainer.checkpoint import load_checkpoint, load_model
from trainer.config import LoraConfig, OptimConfig
from trainer.dist import Dist
from trainer.loss_weights import token_weights
from trainer.optim import build_optimizers


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


# The step's loss ---------------------------------------------------------------------------------


def test_the_step_loss_is_the_mean_over_every_trained_token_of_its_micro_batches():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    batches = []
    for trained in (3, 40):  # two micro-batches with very different numbers of trained tokens
        x = torch.randint(0, 24, (4, 16), generator=g)
        y = torch.randint(0, 24, (4, 16), generator=g)
        keep = torch.zeros(64, dtype=torch.bool)
        keep[torch.randperm(64, generator=g)[:trained]] = True
        batches.append((x, y.masked_fill(~keep.view(4, 16), IGNORE)))

    # By hand: -log p(target) summed over the 43 trained tokens of both, divided by 43.
    nll = sum(-F.log_softmax(model(x)[0], -1).gather(-1, y.clamp(min=0)[..., None])[..., 0][y != IGNORE].sum()
              for x, y in batches)
    hand = nll / 43
    hand.backward()
    hand_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # As train.py's step does it.
    weights = token_weights([y for _, y in batches], Dist())
    step_loss = 0.0
    for (x, y), w in zip(batches, weights):
        _, loss = model(x, y)
        step_loss += loss.detach() * w
        (loss * w).backward()
    assert torch.allclose(step_loss, hand.detach(), atol=1e-6)
    for p, want in zip(model.parameters(), hand_grads):
        assert torch.allclose(p.grad, want, atol=1e-6)
    # The per-micro-batch mean it replaces weighs the 3 tokens like the 40: a different loss.
    plain = sum(model(x, y)[1] for x, y in batches) / 2
    assert abs(plain.item() - hand.item()) > 1e-2


# LoRA --------------------------------------------------------------------------------------------


def test_lora_starts_at_the_base_trains_only_adapters_and_merges_to_the_same_logits():
    base = tiny_gpt(tie_weights=False)
    model = copy.deepcopy(base)
    add_adapters(model, LoraConfig(rank=4, targets=["attn", "mlp", "head"]), token_ids=[20, 21, 22])
    x = torch.randint(0, 24, (3, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(x)[0], base(x)[0])  # B = 0 and zero token rows: exactly the base

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.endswith("token_rows") for n in trained)
    assert len(frozen) == len(list(base.parameters()))
    opt = build_optimizers(model, OptimConfig(optimizer="muon", warmup_iters=0), "cpu")
    assert all(type(o).__name__ == "AdamW" for o in opt.optimizers)  # adapters never go to Muon
    opt.set_lr_multiplier(1.0)
    for _ in range(3):
        model(x, x.roll(-1, 1))[1].backward()
        for o in opt.optimizers:
            o.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.blocks[0].attn.c_attn.lora_B.abs().sum() > 0  # the adapters moved
    adapted = model(x)[0]
    assert not torch.allclose(adapted, base(x)[0], atol=1e-4)

    from model.lora import merge_adapters

    merge_adapters(model)
    assert all(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    plain = tiny_gpt(tie_weights=False)
    plain.load_state_dict(model.state_dict())  # an ordinary model of its family
    assert torch.allclose(plain(x)[0], adapted, atol=1e-5)


def test_lora_on_a_tied_head_shares_the_token_rows_and_refuses_a_head_adapter():
    model = tiny_gpt(tie_weights=True)
    with pytest.raises(UserError, match="head is tied"):
        add_adapters(copy.deepcopy(model), LoraConfig(rank=2, targets=["attn", "head"]))
    add_adapters(model, LoraConfig(rank=2, targets=["mlp"]), token_ids=[23])
    assert model.wte.token_rows is model.lm_head.token_rows
    with torch.no_grad():
        model.wte.token_rows.normal_()
    x = torch.randint(0, 24, (2, 16))
    before = model(x)[0]
    from model.lora import merge_adapters

    merge_adapters(model)
    assert model.wte.weight is model.lm_head.weight and torch.allclose(model(x)[0], before, atol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "rwkv", "ngram"])
def test_lora_on_a_family_without_projections_is_refused_by_name_before_the_run_starts(arch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([f"configs/{arch}.yaml", "lora.rank=4", "train.device=cpu", f"out_dir={tmp_path / 'run'}"])
    assert exit_.value.code == 2 and not (tmp_path / "run").exists()
    assert f"model.arch={arch} has no 'attn' projections to adapt (it has: none)" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"no 'conv' projections to adapt \(it has: attn, mlp, head\)"):
        add_adapters(tiny_gpt(), LoraConfig(rank=2, targets=["conv"]))


# evaluate.py's scoring ------------------------------------------------------------------------------


class Forced(torch.nn.Module):
    """A 'model' that writes a given reply after each prompt: the generation interface only."""

    def __init__(self, replies: dict[tuple, list[int]], vocab: int, end: int):
        super().__init__()
        self.replies, self.vocab, self.end = replies, vocab, end

    def decoder(self, use_cache=True, decode="dynamic", max_len=0):
        return self

    def next_logits(self, tokens):
        logits = torch.full((tokens.shape[0], self.vocab), -1e9)
        for r, row in enumerate(tokens.tolist()):
            prompt = next(p for p in self.replies if tuple(row[:len(p)]) == p)
            reply = self.replies[prompt] + [self.end]
            logits[r, reply[min(len(row) - len(prompt), len(reply) - 1)]] = 0.0
        return logits


@pytest.mark.parametrize("right", [True, False])
def test_evaluate_scores_a_right_model_100_and_a_wrong_one_0(right):
    records = [(r, f"test.jsonl:{i + 1}") for i, r in enumerate(
        make_task("addition", 12, 0, "test") + make_task("identity", 6, 0, "test"))]
    text = "".join(m["content"] for r, _ in records for m in r["messages"]) + "0123456789 ="
    template = ChatTemplate(with_chat_tokens(CharTokenizer.from_text(text)))
    prompts = [template.render_for_generation(r["messages"][:-1]) for r, _ in records]

    def write(reference):  # the wrong model adds one to the sum, or answers something else
        if right:
            return reference
        return reference[:-1] + str((int(reference[-1]) + 1) % 10) if reference[-1].isdigit() else "I am me."

    model = Forced({tuple(p): template.tokenizer.encode(write(r["messages"][-1]["content"]))
                    for p, (r, _) in zip(prompts, records)}, template.tokenizer.vocab_size, template.assistant_end_id)
    replies = evaluate.generate_replies(model, template, prompts, 128, 256, batch_size=5, device="cpu")
    results = evaluate.score(records, replies)
    summary = evaluate.report(results).splitlines()
    k = 18 if right else 0
    assert summary[-1] == f"accuracy: {k}/18 ({100 * k / 18:.1f}%)"
    assert summary[:2] == [f"addition: {12 if right else 0}/12 ({100.0 if right else 0.0:.1f}%)",
                           f"identity: {6 if right else 0}/6 ({100.0 if right else 0.0:.1f}%)"]
    assert all(r["reply"] == write(rec["messages"][-1]["content"]) for r, (rec, _) in zip(results, records))


# A tiny SFT run from the char base, with LoRA --------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rng = __import__("random").Random(0)
    words = "the king sat on his throne and spoke".split()
    lines = [{"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 2)))},
                           {"role": "assistant", "content": rng.choice(words)}]} for _ in range(200)]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = root / "lora"
    args = ["configs/sft.yaml", f"init_from={tiny_run}", f"data.input={data}", f"data.prepared_dir={root / 'prep'}",
            "data.val_fraction=0.1", "lora.rank=4", "lora.targets=[attn,mlp,head]", "train.max_iters=6",
            "train.eval_interval=3", "train.eval_batches=1", "train.batch_size=4", "train.device=cpu",
            "train.keep_last=2"]
    train.main([*args, f"out_dir={out}"])  # in-process: a fresh interpreter costs more than the run
    return out, data, args


def test_a_lora_run_changes_only_its_adapters_and_new_token_rows(sft_run, tiny_run):
    out, _, _ = sft_run
    ckpt, base = load_checkpoint(out / "latest.pt"), load_checkpoint(tiny_run / "best.pt")
    assert ckpt["config"]["init_from"] == str(tiny_run)  # the reference to the base
    adapters = {k for k in ckpt["model"] if ".lora_" in k or k.endswith("token_rows")}
    assert {"blocks.0.attn.c_attn.lora_A", "lm_head.lora_B", "wte.token_rows", "lm_head.token_rows"} <= adapters
    for name, tensor in ckpt["model"].items():
        if name not in adapters:  # frozen: the base's weights (and the chat tokens' new mean rows)
            assert torch.equal(tensor[:len(base["model"][name])], base["model"][name]), name
    assert ckpt["model"]["wte.token_rows"].abs().sum() > 0  # the chat tokens' rows did train
    assert {p for group in ckpt["optimizer"]["param_groups"] for p in group["params"]} == adapters


def test_a_lora_chat_run_resumes_exactly(sft_run, tmp_path):
    out, _, args = sft_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.copy(again / "ckpt-0000003.pt", again / "latest.pt")  # as if stopped at step 3
    train.main([*args, f"out_dir={again}", "resume=true"])  # the same command again, init_from included
    resumed, straight = load_checkpoint(again / "latest.pt"), load_checkpoint(out / "latest.pt")
    assert resumed["iter"] == straight["iter"] == 6 and resumed["loader"] == straight["loader"]
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])


def test_a_lora_chat_run_plans_with_dry_run_and_writes_nothing(sft_run, tmp_path, capsys):
    out, _, args = sft_run
    train.main([*args, f"out_dir={tmp_path / 'plan'}", "--dry-run"])
    printed = capsys.readouterr().out
    assert "lora.rank=4" in printed and "time:" in printed and not (tmp_path / "plan").exists()


def test_merge_gives_the_logits_of_the_unmerged_model(sft_run, tmp_path):
    out, _, _ = sft_run
    convert_main(["merge", str(out), "--out", str(tmp_path / "merged")])
    merged, tok, cfg, _ = load_model(tmp_path / "merged")
    lora, _, _, _ = load_model(out)
    assert cfg.lora.rank == 0 and not any(".lora_" in k for k in merged.state_dict())
    template = ChatTemplate(tok)
    x = torch.tensor([template.render_for_generation([{"role": "user", "content": "the king"}])])
    assert torch.allclose(merged(x)[0], lora(x)[0], atol=1e-5)
    with pytest.raises(SystemExit):  # never over an existing checkpoint
        convert_main(["merge", str(out), "--out", str(tmp_path / "merged")])
    exported, merged_state = load_run(str(out))[1], load_run(str(tmp_path / "merged"))[1]  # export merges too
    assert exported.keys() == merged_state.keys()
    assert all(torch.equal(exported[k], merged_state[k]) for k in exported)


def test_the_chat_repl_over_a_pipe(sft_run, capsys, monkeypatch):
    out, _, _ = sft_run
    args = ["--ckpt", str(out), "--chat", "--device", "cpu", "--max-new-tokens", "6", "--system", "be kind",
            "--temperature", "0"]
    full = run_py("sample.py", *args, input="the king sat\nhis throne\n/reset\nand spoke\n/exit\n" + "spoke " * 20)
    assert full.returncode == 0, full.stderr
    assert "(new conversation)" in full.stderr
    assert "dropped the 1 oldest turn" in full.stderr  # the 32-token window overflowed on the second turn
    assert "does not fit" not in full.stderr  # the line after /exit was never read
    monkeypatch.setattr("sys.stdin", io.StringIO("the king sat\nhis throne\n"))  # then end of input (Ctrl-D)
    sample.main(args)
    part = capsys.readouterr().out
    assert part and full.stdout.startswith(part) and len(part) < len(full.stdout)


def test_a_chat_checkpoint_samples_plain_text_and_chat_needs_chat_tokens(sft_run, tiny_run, capsys):
    out, data, _ = sft_run
    sample.main(["--ckpt", str(out), "--prompt", "the king", "--max-new-tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("the king")
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--ckpt", str(tiny_run), "--chat", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "no chat tokens" in err
    few, results = out / "few.jsonl", out / "results.jsonl"
    few.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))
    evaluate.main(["--ckpt", str(out), "--data", str(few), "--out", str(results), "--max-new-tokens", "4",
                   "--device", "cpu"])
    assert re.fullmatch(r"accuracy: \d+/10 \(\d+\.\d%\)\n", capsys.readouterr().out)
    assert [json.loads(line)["where"] for line in results.read_text().splitlines()] == [f"{few}:{i}" for i in range(1, 11)]

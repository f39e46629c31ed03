"""DPO: preference data (completion-only targets, bad lines), the loss and its gradient, and a
tiny train.py run with LoRA (reference = adapters off) logging the DPO metrics."""

import json
import math

import pytest
import torch

import train
from chat.template import ChatTemplate
from common.errors import UserError
from data.preferences import PreferenceSplit
from data.prepare import prepare
from data.tokenizer import from_state
from model import GPT, GPTConfig
from model.lora import add_adapters, adapters_off
from trainer.config import LoraConfig
from trainer.objectives import DPO, completion_logps

PAIRS = [
    {"prompt": "what is 2 + 2?", "chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 3 and 4"},
                {"role": "assistant", "content": "3 + 4 = 7"}, {"role": "user", "content": "and 5 + 6?"}],
     "chosen": "5 + 6 = 11", "rejected": "it is 12, i think"},
]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    rows = PAIRS * 30  # both splits get pairs
    rows = [{**r, "chosen": f"{r['chosen']} ({i})"} for i, r in enumerate(rows)]
    return prepare([str(write_jsonl(root / "pairs.jsonl", rows))], "char", root / "prep", 0.2, log=lambda *_: None,
                   format="preference")


@pytest.fixture(scope="module")
def split(prepared):
    return PreferenceSplit(prepared, "train", block_size=96)


@pytest.fixture(scope="module")
def template(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["format"] == "preference"
    return ChatTemplate(from_state(meta["tokenizer"]))


def test_targets_are_the_final_reply_only(split, template):
    pairs = split.usable[:8]
    x, y = split.batch(pairs, "cpu")
    assert x.shape[0] == 16 and x.shape == y.shape
    decode, end = template.tokenizer.decode, "<|assistant_end|>"
    for r in range(16):
        targets = decode([t for t in y[r].tolist() if t >= 0])
        full = decode(x[r].tolist())
        assert targets.endswith(end)
        reply = targets[:-len(end)]
        assert reply.split(" (")[0] in {p[k] for p in PAIRS for k in ("chosen", "rejected")}
        assert (r < 8) == ("(" in reply)  # chosen rows first (they carry the index), then rejected
        # The prompt (and an earlier assistant turn of a multi-turn prompt) is never a target.
        assert "3 + 4 = 7" not in targets and "<|user_end|>" not in targets and full.count("<|assistant_start|>") >= 1


def tiny(vocab):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=96, n_layer=2, n_head=2, n_embd=32))


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(split, template):
    model = tiny(template.tokenizer.vocab_size)
    objective = DPO(model, beta=0.1, lora=False)
    loss, stats = objective.loss(model, *split.batch(split.usable[:6], "cpu"))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats[1:4].abs().max().item() < 1e-6  # reward_chosen, reward_rejected, margin


def test_nll_adds_the_chosen_replies_loss_per_token(split, template):
    model = tiny(template.tokenizer.vocab_size)
    x, y = split.batch(split.usable[:6], "cpu")
    plain, plain_stats = DPO(model, beta=0.1, lora=False).loss(model, x, y)
    loss, stats = DPO(model, beta=0.1, lora=False, nll=0.5).loss(model, x, y)
    logits, _ = model(x[:6])
    nll = torch.stack([torch.nn.functional.cross_entropy(logits[r], y[r], ignore_index=-1) for r in range(6)]).mean()
    assert loss.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-5)
    assert torch.equal(stats, plain_stats)  # dpo_loss and the rewards stay DPO's own


class Table(torch.nn.Module):
    """A toy 'model': free logits per position, the same for every row."""

    def __init__(self, length, vocab):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(length, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.logits[:x.shape[1]].expand(x.shape[0], -1, -1), None


def test_a_dpo_step_moves_chosen_up_and_rejected_down(template):
    ids = template.tokenizer.encode
    prompt = template.render_for_generation([{"role": "user", "content": "2+2?"}])
    rows = [prompt + ids(reply) + [template.assistant_end_id] for reply in ("4", "5")]
    x = torch.tensor([r[:-1] for r in rows])
    y = torch.tensor([[-1] * (len(prompt) - 1) + r[len(prompt):] for r in rows])  # the completion only
    model = Table(x.shape[1], template.tokenizer.vocab_size)
    objective = DPO(model, beta=0.5, lora=False)
    before = completion_logps(model, x, y).detach()
    loss, _ = objective.loss(model, x, y)
    loss.backward()
    # At the start (policy = reference) the loss's slope is -beta/2 for the chosen reply's
    # log-probability and +beta/2 for the rejected one's; a gradient step follows it.
    with torch.no_grad():
        model.logits -= 0.1 * model.logits.grad
    after = completion_logps(model, x, y).detach()
    assert after[0] > before[0] and after[1] < before[1]
    loss, stats = objective.loss(model, x, y)
    assert loss.item() < math.log(2) and stats[1] > 0 > stats[2] and stats[4] == 1.0
    assert torch.equal(completion_logps(objective.reference, x, y), before)  # the reference stays frozen


def test_lora_reference_is_the_model_with_adapters_off(split, template):
    model = tiny(template.tokenizer.vocab_size)
    x, y = split.batch(split.usable[:3], "cpu")
    base = completion_logps(model, x, y).detach()
    add_adapters(model, LoraConfig(rank=4, targets=["attn", "mlp"]), [1, 2])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "token_rows" in name:
                p.normal_(0, 0.5)  # as if trained: the policy now differs from its base
    objective = DPO(model, beta=0.1, lora=True)
    assert not torch.allclose(completion_logps(model, x, y), base)
    assert torch.allclose(objective.reference_logps(x, y), base, atol=1e-5)
    with adapters_off(model):
        pass
    assert not torch.allclose(completion_logps(model, x, y), base)  # adapters back on after


@pytest.mark.parametrize("line, error", [
    ({"prompt": "hi", "chosen": "a"}, "no 'rejected' field"),
    ({"chosen": "a", "rejected": "b"}, "no 'prompt' field"),
    ({"prompt": "hi", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "hi", "chosen": "a", "rejected": 3}, "'rejected' must be a string"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt: messages\\[0\\]"),
    ("[1, 2]", "a preference line is a JSON object"),
    ("{oops", ""),
])
def test_bad_preference_lines_name_file_and_line(tmp_path, line, error):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], line])
    with pytest.raises(UserError, match=f"bad.jsonl:2: {error}"):
        prepare([str(path)], "char", tmp_path / "prep", 0.5, log=lambda *_: None, format="preference")
    assert not (tmp_path / "prep" / "meta.json").exists()


def test_dpo_needs_preference_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["configs/dpo.yaml", "data.format=chat", f"out_dir={tmp_path / 'x'}"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: train.objective=dpo with data.format=chat: DPO trains on preference pairs and only on them "
        "(train.objective=dpo with data.format=preference)"]
    assert not (tmp_path / "x").exists()


def test_a_tiny_lora_dpo_run_logs_the_rewards(prepared, tmp_path):
    pairs = prepared.parent / "pairs.jsonl"
    train.main(["configs/dpo.yaml", f"data.input=[{pairs}]", "data.tokenizer=char", "data.val_fraction=0.2",
                f"data.prepared_dir={tmp_path / 'prep'}", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                "model.block_size=96", "lora.rank=4", "optim.lr=3e-3", "train.batch_size=4", "train.max_iters=8",
                "train.eval_interval=4", "train.log_interval=4", "train.threads=1", f"out_dir={tmp_path / 'run'}"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logs, evals = [r for r in rows if "dpo_loss" in r], [r for r in rows if "val_dpo_loss" in r]
    names = ("dpo_loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
    assert logs and all(all(n in r for n in names) for r in logs)
    assert evals and all(all(f"val_{n}" in r for n in names) and r["val_loss"] == r["val_dpo_loss"] for r in evals)
    assert logs[0]["dpo_loss"] == pytest.approx(math.log(2), abs=0.05)
    assert evals[-1]["val_reward_margin"] > 0 and logs[-1]["dpo_loss"] < math.log(2)

"""Chat data: prep into token + mask shards, every bad line, and packing that never trains on context."""

import json
import random

import numpy as np
import pytest

import data.prepare as prep
from chat.template import ChatTemplate
from common.errors import UserError
from data.loader import build_loader, open_split, packed_eval_batches
from data.packing import ConversationSplit
from data.prepare import prepare, read_meta
from data.tokenizer import CharTokenizer, from_state
from model import IGNORE

WORDS = "the cat sat on a mat and then it ran off to see the dog".split()


def conversations(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        system = [{"role": "system", "content": "be kind " * rng.randint(0, 2)}] if i % 3 == 0 else []
        turns = [m for _ in range(rng.randint(1, 3)) for m in (
            {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))},
            {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))})]
        out.append({"messages": system + turns, "task": "echo"})
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", conversations(300))


@pytest.fixture(scope="module")
def prepared(chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "chat"
    prepare([str(chat_file)], CharTokenizer.from_text(" ".join(WORDS) + "bek"), out, 0.2, log=lambda *a: None,
            format="chat", shard_tokens=2000)
    return out


def test_prep_writes_a_mask_shard_beside_each_token_shard(prepared, chat_file):
    meta = read_meta(prepared)
    assert meta["format"] == "chat" and meta["documents"]["train"] + meta["documents"]["val"] == 300
    tok = from_state(meta["tokenizer"])
    template = ChatTemplate(tok)  # the state rebuilds a chat tokenizer
    assert meta["bos_id"] == template.bos_id
    rendered = {}
    for conv in conversations(300):
        ids, mask = template.render(conv["messages"])
        rendered[tuple(ids)] = mask
    found = 0
    for split in ("train", "val"):
        shards = meta["splits"][split]
        assert len(shards) > 1  # shard_tokens=2000 cut them, between conversations
        for s in shards:
            tokens = np.fromfile(prepared / s["file"], dtype=meta["dtype"])
            mask = np.fromfile(prepared / s["mask"], dtype=np.uint8)
            assert len(tokens) == len(mask) == s["tokens"] and tokens[0] == template.bos_id
            starts = list(np.flatnonzero(tokens == template.bos_id)) + [len(tokens)]
            for a, b in zip(starts, starts[1:]):  # every conversation whole, with its own mask
                assert rendered[tuple(tokens[a:b].tolist())] == mask[a:b].tolist()
                found += 1
    assert found == 300
    assert tok.decode([template.assistant_end_id]) == "<|assistant_end|>"


@pytest.mark.parametrize("line, error", [
    ("{not json", "not valid JSON"),
    ({"text": "hi"}, "no 'messages' field"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "ho"}]}, "cannot come first"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}, "must be a string"),
])
def test_a_bad_line_names_file_and_line_exits_2_and_writes_nothing(tmp_path, capsys, prepared, line, error):
    bad = write_jsonl(tmp_path / "bad.jsonl", conversations(4) + [line] + conversations(2, seed=1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # an earlier prep: must survive
    with pytest.raises(SystemExit) as exit_:
        prep.main(["--input", str(bad), "--format", "chat", "--tokenizer", "char", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0
    assert f"{bad}:5: " in err and error in err, err
    assert sorted(p.name for p in out.iterdir()) == [".lock", "meta.json"] and (out / "meta.json").read_text() == "{}"


def test_a_char_base_refuses_characters_it_lacks(tmp_path, chat_file):
    with pytest.raises(UserError, match=r"chat.jsonl:1: characters not in the char vocabulary: 'en'"):
        prepare([str(chat_file)], CharTokenizer.from_text("bcdfgikmoprs "), tmp_path / "p", 0.2,
                log=lambda *a: None, format="chat")


def rows_and_roles(x, y, template):
    """For every input position: whether the token after it is assistant text or its end token."""
    start, end = template.assistant_start_id, template.assistant_end_id
    learn = np.zeros(x.shape, dtype=bool)
    for r in range(x.shape[0]):
        inside = False
        for t in range(x.shape[1]):
            token = x[r, t + 1] if t + 1 < x.shape[1] else None
            if x[r, t] == start:
                inside = True
            if token is not None and inside:
                learn[r, t] = True
            if token == end:
                inside = False
            if token is not None and token in template.special_ids.values() and token != end:
                learn[r, t] = False
    return learn


def test_packing_trains_on_assistant_tokens_only_and_keeps_conversations_whole(prepared):
    template = ChatTemplate(from_state(read_meta(prepared)["tokenizer"]))
    block = 48  # shorter than many conversations: those are truncated, never split across rows
    data = open_split(prepared, "train", block)
    loader = build_loader("random", data, 8, block, seed=0, device="cpu", warn=lambda *a: None)
    trained = 0
    for _ in range(20):
        x, y = (t.numpy() for t in loader.next_batch())
        assert (x[:, 0] == template.bos_id).all()  # a row starts with a conversation
        counted = y != IGNORE
        assert counted.any(axis=1).all()  # every row trains on something
        learn = rows_and_roles(x, y, template)
        # Except the last position, whose next token is not in x, targets are counted exactly where
        # the next token is assistant text or assistant-end: never a user, system or bos token.
        assert (counted[:, :-1] == learn[:, :-1]).all()
        assert (y[counted] == np.concatenate([x[:, 1:], y[:, -1:]], axis=1)[counted]).all()
        trained += counted.sum()
    assert trained > 0


def test_packing_resumes_exactly_and_ranks_share_one_stream(prepared):
    data = open_split(prepared, "train", 64)

    def batches(loader, n):
        return [loader.next_batch()[0].tolist() for _ in range(n)]

    one = build_loader("random", data, 4, 64, seed=3, device="cpu", grad_accum=2)
    first = batches(one, 3)
    state = one.state()
    rest = batches(one, 5)
    again = build_loader("random", data, 4, 64, seed=3, device="cpu", grad_accum=2)
    again.load_state(state)
    assert batches(again, 5) == rest
    # 2 ranks x accumulation 1 take the rows 1 process x accumulation 2 takes, step by step.
    ranks = [build_loader("random", data, 4, 64, seed=3, device="cpu", rank=r, world_size=2) for r in (0, 1)]
    mixed = [row for _ in range(2) for loader in ranks for row in loader.next_batch()[0].tolist()]
    assert mixed == [row for batch in first + rest[:1] for row in batch]


def test_evaluation_visits_every_usable_conversation_once(prepared):
    data = open_split(prepared, "val", 64)
    assert isinstance(data, ConversationSplit)
    template = ChatTemplate(from_state(read_meta(prepared)["tokenizer"]))
    opens = [template.special_ids[t] for t in ("<|system_start|>", "<|user_start|>")]
    starts = sum(int(((x[:, :-1] == template.bos_id) & np.isin(x[:, 1:], opens)).sum())  # bos also pads
                 for x in (x.numpy() for x, _ in packed_eval_batches(data, 4, 64, "cpu")))
    assert starts == data.trainable(65).sum() > 0

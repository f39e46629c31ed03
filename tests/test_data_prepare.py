"""Prep: every input format, the split, shards, staleness, interruption, and every bad input."""

import gzip
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tiktoken.load

import data.prepare as prep
import data.sources as sources
from data.loader import TokenSplit
from data.prepare import prepare, read_meta
from data.tokenizer import CHAR_SEPARATOR, from_state
from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta naïve café 日本 😀 the of and to in".split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + "\n" for i in range(n)]


def split_tokens(out, split):
    data = TokenSplit(out, split)
    return data.read(0, data.num_tokens).tolist() if data.num_tokens else []


def documents(out, split):
    """The documents of a split, decoded and cut at the separator the meta file records."""
    meta = read_meta(out)
    tok = from_state(meta["tokenizer"])
    text = tok.decode(split_tokens(out, split))
    assert text.endswith(meta["document_separator"]) or not text
    return text.split(meta["document_separator"])[:-1]


def quiet(*args):
    pass


def gpt2_or_skip():
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tiktoken.load, "read_file", lambda *a, **k: (_ for _ in ()).throw(ConnectionError()))
            from data.tokenizer import TiktokenTokenizer
            TiktokenTokenizer.openai("gpt2")
    except UserError:
        pytest.skip("gpt2 vocabulary not cached; set TIKTOKEN_CACHE_DIR")


def write_formats(root, docs):
    """The same documents spread over every file format (Parquet when pyarrow is installed)."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0], encoding="utf-8")
    (root / "sub" / "b.md").write_text(docs[1], encoding="utf-8")
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n\n" for i, d in enumerate(docs[2:6])))
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[6:10])
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return docs[:10]
    pq.write_table(pa.table({"text": docs[10:14], "n": list(range(4))}), root / "e.parquet", row_group_size=2)
    return docs[:14]


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_every_format_from_a_folder(tmp_path, tokenizer):
    if tokenizer == "gpt2":
        gpt2_or_skip()
    expected = write_formats(tmp_path / "corpus", make_docs(14))
    out = prepare([str(tmp_path / "corpus")], tokenizer, tmp_path / "out", 0.3, log=quiet)
    meta = read_meta(out)
    assert meta["split_by"] == "document"
    got = documents(out, "train") + documents(out, "val")
    assert sorted(got) == sorted(expected)
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(expected)
    assert meta["dtype"] == "uint16"
    if tokenizer == "gpt2":
        assert meta["eot_id"] == 50256 and meta["document_separator"] == "<|endoftext|>"
    else:
        assert meta["document_separator"] == CHAR_SEPARATOR


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet input needs the optional pyarrow")
    import pyarrow.parquet as pq

    docs = make_docs(6)
    pq.write_table(pa.table({"body": docs}), tmp_path / "x.parquet", row_group_size=4)
    out = prepare([str(tmp_path / "x.parquet")], "char", tmp_path / "out", 0.5, log=quiet, text_field="body")
    assert sorted(documents(out, "train") + documents(out, "val")) == sorted(docs)
    with pytest.raises(UserError, match="no 'text' column"):
        prepare([str(tmp_path / "x.parquet")], "char", tmp_path / "out2", log=quiet)


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="pip install pyarrow"):
        prepare([str(tmp_path / "x.parquet")], "char", tmp_path / "out", log=quiet)


def test_glob_and_text_field(tmp_path):
    docs = make_docs(8)
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[i * 4:i * 4 + 4]))
    (tmp_path / "ignored.txt").write_text("not matched by the glob")
    out = prepare([str(tmp_path / "part*.jsonl")], "char", tmp_path / "out", 0.4, log=quiet, text_field="body")
    assert sorted(documents(out, "train") + documents(out, "val")) == sorted(docs)


@pytest.mark.parametrize("shard_tokens", [100_000_000, 997])
def test_single_document_splits_by_byte_position(tmp_path, monkeypatch, shard_tokens):
    gpt2_or_skip()
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)  # streamed in pieces all the same
    text = "".join(make_docs(200)) + "é" * 50  # a multi-byte character may sit at the cut
    (tmp_path / "novel.txt").write_text(text, encoding="utf-8")
    out = prepare([str(tmp_path / "novel.txt")], "gpt2", tmp_path / "out", 0.1, log=quiet, shard_tokens=shard_tokens)
    meta = read_meta(out)
    assert meta["split_by"] == "position" and meta["eot_id"] is None
    tok = from_state(meta["tokenizer"])
    data = text.encode()
    cut = len(data) - int(len(data) * 0.1)
    train_text = data[:cut].decode("utf-8", "ignore")
    assert split_tokens(out, "train") == tok.encode(train_text)
    assert split_tokens(out, "val") == tok.encode(text[len(train_text):])
    listed = {s["file"] for shards in meta["splits"].values() for s in shards}
    assert {f.name for f in out.glob("*.bin")} == listed
    assert all(0 < s["tokens"] <= shard_tokens for shards in meta["splits"].values() for s in shards)


def test_large_document_streams_in_pieces_with_identical_tokens(tmp_path, monkeypatch):
    gpt2_or_skip()
    monkeypatch.setattr(sources, "CHUNK_BYTES", 997)  # many pieces, cut mid-character too
    monkeypatch.setattr(prep, "BATCH_CHARS", 1500)
    text = "".join(make_docs(150)) + "  trailing   spaces\n\n\n  and more"
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    (tmp_path / "other.txt").write_text("a second document", encoding="utf-8")
    utf8 = sources.Utf8Errors()
    pieces = list(sources.read_text_pieces(tmp_path / "big.txt", utf8))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert max(map(len, pieces)) < 2 * 997
    (tmp_path / "cjk.txt").write_text("日本語のテキスト" * 2000, encoding="utf-8")  # no whitespace at all
    cjk = list(sources.read_text_pieces(tmp_path / "cjk.txt", utf8))
    assert "".join(cjk) == "日本語のテキスト" * 2000 and max(map(len, cjk)) <= 997
    (tmp_path / "cjk.txt").unlink()
    out = prepare([str(tmp_path)], "gpt2", tmp_path / "out", 0.5, log=quiet, shard_tokens=500)
    tok = from_state(read_meta(out)["tokenizer"])
    streams = split_tokens(out, "train") + split_tokens(out, "val")
    whole = tok.encode(text) + [tok.eot_id]
    assert any(streams[i:i + len(whole)] == whole for i in (0, len(streams) - len(whole)))


def test_split_is_stable_when_files_are_added(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    old = make_docs(40, seed=1)
    for i, d in enumerate(old):
        (corpus / f"old{i:02d}.txt").write_text(d, encoding="utf-8")
    out = prepare([str(corpus)], "char", tmp_path / "out", 0.25, log=quiet)
    before = {split: set(documents(out, split)) for split in ("train", "val")}
    assert before["train"] and before["val"]
    for i, d in enumerate(make_docs(30, seed=2)):
        (corpus / f"new{i:02d}.txt").write_text(d, encoding="utf-8")
    prepare([str(corpus)], "char", tmp_path / "out", 0.25, log=quiet)
    after = {split: set(documents(out, split)) for split in ("train", "val")}
    for split in ("train", "val"):
        assert before[split] <= after[split]
    assert len(after["train"] | after["val"]) == 70


def test_shards_are_bounded_and_workers_do_not_change_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 300)
    (tmp_path / "in").mkdir()
    for i, d in enumerate(make_docs(60)):
        (tmp_path / "in" / f"{i}.txt").write_text(d, encoding="utf-8")
    one = prepare([str(tmp_path / "in")], "char", tmp_path / "one", 0.2, log=quiet, shard_tokens=700, workers=1)
    many = prepare([str(tmp_path / "in")], "char", tmp_path / "many", 0.2, log=quiet, shard_tokens=700, workers=3)
    meta = read_meta(one)
    assert len(meta["splits"]["train"]) > 2
    assert all(s["tokens"] <= 700 for shards in meta["splits"].values() for s in shards)
    for split in ("train", "val"):
        assert split_tokens(one, split) == split_tokens(many, split)
        files = [s["file"] for s in meta["splits"][split]]
        raw = b"".join((one / f).read_bytes() for f in files)
        assert np.frombuffer(raw, dtype="<u2").tolist() == split_tokens(one, split)


def test_up_to_date_folder_is_reused_and_changes_are_noticed(tmp_path):
    (tmp_path / "a.txt").write_text("first version of the text " * 20)
    logs = []
    prepare([str(tmp_path / "a.txt")], "char", tmp_path / "out", log=logs.append)
    assert len(logs) == 2  # preparing ..., prepared ...
    prepare([str(tmp_path / "a.txt")], "char", tmp_path / "out", log=logs.append)
    assert len(logs) == 2
    (tmp_path / "a.txt").write_text("second version of the text " * 20)
    prepare([str(tmp_path / "a.txt")], "char", tmp_path / "out", log=logs.append)
    assert "stale" in logs[2]
    prepare([str(tmp_path / "a.txt")], "char", tmp_path / "out", 0.2, log=logs.append)
    assert "stale" in logs[4]


def test_interrupted_prep_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    for i, d in enumerate(make_docs(80)):
        (tmp_path / "in" / f"{i}.txt").write_text(d, encoding="utf-8")
    args = ([str(tmp_path / "in")], "char", tmp_path / "out", 0.2)
    reference = prepare(*args[:2], tmp_path / "ref", 0.2, log=quiet, shard_tokens=500)

    monkeypatch.setattr(prep, "BATCH_CHARS", 200)
    real_encode, calls = prep._encode_batch, []

    def crash_later(*a):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real_encode(*a)

    monkeypatch.setattr(prep, "_encode_batch", crash_later)
    with pytest.raises(KeyboardInterrupt):
        prepare(*args, log=quiet, shard_tokens=500)
    out = tmp_path / "out"
    assert read_meta(out) is None  # no meta: the folder is incomplete
    assert not list(out.glob("*.tmp"))
    assert list(out.glob("*.bin"))  # complete shards were written before the crash

    monkeypatch.setattr(prep, "_encode_batch", real_encode)
    logs = []
    prepare(*args, log=logs.append, shard_tokens=500)
    assert "missing" in logs[0]
    for split in ("train", "val"):
        assert split_tokens(out, split) == split_tokens(reference, split)
    listed = {s["file"] for shards in read_meta(out)["splits"].values() for s in shards}
    assert {f.name for f in out.glob("*.bin")} == listed


def test_bpe_tokenizer_through_prep(tmp_path):
    (tmp_path / "in").mkdir()
    docs = make_docs(60)
    for i, d in enumerate(docs):
        (tmp_path / "in" / f"{i}.txt").write_text(d, encoding="utf-8")
    out = prepare([str(tmp_path / "in")], "bpe", tmp_path / "out", 0.2, log=quiet, bpe_vocab_size=300, workers=1)
    meta = read_meta(out)
    assert meta["vocab_size"] == 300 and meta["eot_id"] == 299
    assert (out / "bpe.tiktoken").is_file()
    assert sorted(documents(out, "train") + documents(out, "val")) == sorted(docs)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="no such file or folder: .*nope.txt"):
        prepare([str(tmp_path / "nope.txt")], "char", tmp_path / "out", log=quiet)
    with pytest.raises(UserError, match="no file matches"):
        prepare([str(tmp_path / "*.jsonl")], "char", tmp_path / "out", log=quiet)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="corpus is empty"):
        prepare([str(tmp_path / "empty.txt")], "char", tmp_path / "out", log=quiet)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="corpus is empty"):
        prepare([str(tmp_path / "empty.jsonl")], "char", tmp_path / "out", log=quiet)


def test_corpus_shorter_than_a_context_window(tmp_path, capsys):
    import train

    (tmp_path / "short.txt").write_text("just a few words of text")
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(REPO / "configs" / "small.yaml"), f"data.input={tmp_path / 'short.txt'}", f"out_dir={tmp_path / 'run'}",
                    f"data.prepared_dir={tmp_path / 'prep'}", "model.block_size=64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than one context window" in err[0] and "block_size=64" in err[0]


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe then more \xc3 and the end " * 10)
    logs = []
    out = prepare([str(tmp_path / "bad.txt")], "char", tmp_path / "out", log=logs.append)
    assert read_meta(out)["invalid_utf8"] == {str(tmp_path / "bad.txt"): 30}
    assert any("replaced 30 invalid UTF-8 sequences" in line for line in logs)
    assert "\ufffd" in from_state(read_meta(out)["tokenizer"]).chars


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    ('{"body": "x"}', r"bad.jsonl:2: no 'text' field \(keys: body\)"),
    ('["a list"]', r"bad.jsonl:2: no 'text' field"),
    ('{"text": 3}', r"bad.jsonl:2: field 'text' is a int"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        prepare([str(tmp_path / "bad.jsonl")], "char", tmp_path / "out", log=quiet)


def test_binary_files_in_a_folder_are_skipped_with_a_warning(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text " * 50)
    (tmp_path / "in" / "b.txt").write_text("other text " * 50)
    (tmp_path / "in" / "image.dat").write_bytes(b"\x89PNG\x00\x00binary")
    (tmp_path / "in" / "archive.gz").write_bytes(gzip.compress(b"text"))
    logs = []
    out = prepare([str(tmp_path / "in")], "char", tmp_path / "out", 0.5, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning: skipping")]
    assert len(warnings) == 2 and "image.dat" in warnings[1] and "archive.gz" in warnings[0]
    assert len(read_meta(out)["sources"]) == 2
    with pytest.raises(UserError, match="image.dat looks binary"):
        prepare([str(tmp_path / "in" / "image.dat")], "char", tmp_path / "out2", log=quiet)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match="no text found"):
        prepare([str(tmp_path / "bin")], "char", tmp_path / "out3", log=quiet)


def test_unknown_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(UserError, match="data.tokenizer='gpt5' is not one of: char, gpt2, r50k_base"):
        prepare([str(tmp_path / "a.txt")], "gpt5", tmp_path / "out", log=quiet)


def test_undownloadable_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    (tmp_path / "a.txt").write_text("text " * 100)
    with pytest.raises(UserError, match="cl100k_base.*TIKTOKEN_CACHE_DIR"):
        prepare([str(tmp_path / "a.txt")], "cl100k_base", tmp_path / "out", log=quiet)


def test_hugging_face_dataset_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="needs the optional datasets package"):
        prepare(["hf:someone/corpus"], "char", tmp_path / "out", log=quiet)

    def offline(*args, **kwargs):
        raise ConnectionError("cannot reach huggingface.co")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match="cannot stream the Hugging Face dataset 'someone/corpus'.*network"):
        prepare(["hf:someone/corpus"], "char", tmp_path / "out", log=quiet)


def test_hugging_face_dataset_streams_records(tmp_path, monkeypatch):
    docs = make_docs(10)
    requested = []

    def load_dataset(name, split, streaming):
        requested.append((name, split, streaming))
        return iter([{"text": d} for d in docs])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = prepare(["hf:someone/corpus:validation"], "char", tmp_path / "out", 0.5, log=quiet)
    assert requested[0] == ("someone/corpus", "validation", True)
    assert sorted(documents(out, "train") + documents(out, "val")) == sorted(docs)


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(tmp_path / "missing.txt"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: data.input: no such file or folder: {tmp_path / 'missing.txt'}"


def test_concurrent_preps_of_one_folder_prepare_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "in").mkdir()
    for i, d in enumerate(make_docs(30)):
        (tmp_path / "in" / f"{i}.txt").write_text(d, encoding="utf-8")
    logs = []
    with ThreadPoolExecutor(3) as pool:  # as every rank of a distributed run calls prepare
        outs = list(pool.map(lambda _: prepare([str(tmp_path / "in")], "char", tmp_path / "out", 0.3,
                                               log=logs.append), range(3)))
    assert len(set(outs)) == 1 and sum(line.startswith("preparing") for line in logs) == 1
    assert documents(outs[0], "train") and documents(outs[0], "val")


def test_a_single_file_bpe_learns_its_merges_from_the_train_split_only(tmp_path):
    """The val tail of a one-file corpus must not shape the tokenizer (it would leak val)."""
    train_text = "".join(make_docs(60))
    val_text = "zqxj " * (len(train_text) // 5 // 9)  # about a tenth, and made of a pair found nowhere else
    (tmp_path / "novel.txt").write_text(train_text + val_text)
    out = prepare([str(tmp_path / "novel.txt")], "bpe", tmp_path / "out", 0.1, log=quiet, bpe_vocab_size=320)
    tok = from_state(read_meta(out)["tokenizer"])
    assert not [t for t in tok.ranks if b"zq" in t or b"xj" in t]
    both = prepare([str(tmp_path / "novel.txt")], "bpe", tmp_path / "out2", 0.01, log=quiet, bpe_vocab_size=320)
    assert [t for t in from_state(read_meta(both)["tokenizer"]).ranks if b"zq" in t]  # seen when it is train


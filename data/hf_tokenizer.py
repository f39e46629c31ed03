"""Tokenizers in Hugging Face's files, both ways, and the vocabulary lists a GGUF file holds.

    read_hf_tokenizer(folder, eos_id)    vocab.json + merges.txt, or tokenizer.json -> a tokenizer
    write_hf_tokenizer(tok, folder, n)   a tokenizer -> files AutoTokenizer loads offline
    gguf_vocab(tok)                      a tokenizer -> llama.cpp's token list, types and merges

Design decisions:
- Only byte-level BPE converts. Its tokens are byte strings, so tiktoken's ranks (bytes -> id)
  hold it exactly and tiktoken's encoder runs it; SentencePiece-style BPE (byte fallback, `▁`
  for spaces), WordPiece and Unigram are refused with one line.
- A BPE file lists merges in priority order; tiktoken merges the adjacent pair whose joined bytes
  rank lowest. The two encode alike when, for every token, the ranks below it split its bytes
  into exactly the pair the file lists, and the merges come in rank order. Both are checked for
  every token, so a conversion is exact or refused; the same split recovers the merges when
  writing (the recipe HF's own tiktoken converter uses).
- Tokens outside the merges (`<|endoftext|>`, added tokens) become tiktoken special tokens at
  their ids; the end-of-text token is the model's eos token, whatever its name.
- GPT-2's encoding is recognised by the hash of its ranks: an imported GPT-2 gets the `gpt2`
  tokenizer (same ids, same state as `data.tokenizer: gpt2`) with no tiktoken cache or network,
  and an export of it writes vocab.json + merges.txt, as GPT-2's own repositories do.
- Other BPEs are written as one tokenizer.json whose pre-tokenizer splits with the encoding's
  own regex, translated from tiktoken's dialect (Rust fancy-regex) to Oniguruma's (the tokenizers
  library): `$` becomes `\\z` (Oniguruma's `$` also matches before every newline) and
  possessive quantifiers become greedy ones (`{1,3}+` means "repeat" in Oniguruma; in these
  patterns nothing after a quantifier can fail, so giving back never changes a match).
- The char tokenizer is written as a word-level tokenizer.json that isolates every character and
  fuses them back when decoding; exactly that file reads back as the char tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

from common.errors import UserError
from common.files import atomic_write
from data.bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, ranks_to_text
from data.tokenizer import EOT, CharTokenizer, TiktokenTokenizer

# OpenAI's encodings, known by sha256 of ranks_to_text(ranks): (name, split pattern, sha256 of
# the merges as merges.txt lines). A file holding one of them needs no merge-by-merge check.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
KNOWN_ENCODINGS = {
    GPT2_RANKS_SHA256: ("gpt2", GPT2_SPLIT_PATTERN, "04e3597d7996f292ca9b8b7285ca4d58a6ae171ac47d73fc7140ceb0c7a6bbc0"),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7":
        ("cl100k_base", GPT4_SPLIT_PATTERN, "e1f229c309fdbf445c057a66f5e92f32ad9d9c53536bdb49de867906448141ff"),
}

# llama.cpp's names for the split patterns it knows (`tokenizer.ggml.pre`).
GGUF_PRE_TOKENIZERS = {GPT2_SPLIT_PATTERN: "gpt-2", GPT4_SPLIT_PATTERN: "llama-bpe"}


@lru_cache(maxsize=1)
def byte_spelling() -> tuple[dict[int, str], dict[int, str]]:
    """GPT-2's byte-level alphabet: each byte as a printable character; and a str.translate
    table back to the byte as a latin-1 character (characters outside the alphabet become one
    that latin-1 cannot encode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    back = {code: "\uffff" for code in range(256)} | {ord(c): chr(b) for b, c in chars.items()}
    return chars, back


def spell(token: bytes) -> str:
    chars, _ = byte_spelling()
    return "".join(chars[b] for b in token)


def unspell(token: str) -> bytes | None:
    """The bytes a byte-level token stands for, or None when it is not spelled in that alphabet."""
    try:
        return token.translate(byte_spelling()[1]).encode("latin-1")
    except UnicodeEncodeError:
        return None


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merging of `token`'s bytes using only ranks below max_rank: repeatedly join the
    adjacent pair whose joined bytes rank lowest (the leftmost on a tie)."""
    parts = [token[i:i + 1] for i in range(len(token))]

    def pair_rank(i):
        rank = ranks.get(parts[i] + parts[i + 1], max_rank)
        return rank if rank < max_rank else max_rank

    pairs = [pair_rank(i) for i in range(len(parts) - 1)]
    while pairs and (best := min(pairs)) < max_rank:
        i = pairs.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pairs[i]
        if i < len(pairs):
            pairs[i] = pair_rank(i)
        if i > 0:
            pairs[i - 1] = pair_rank(i - 1)
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in priority order, that encodes as tiktoken does with these ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = bpe_split(ranks, token, rank)
            if len(parts) != 2:
                raise UserError(f"token {token!r} (id {rank}) cannot be made by one merge of lower-ranked tokens; "
                                f"this vocabulary has no merge-list form")
            merges.append((parts[0], parts[1]))
    return merges


def ranks_sha256(ranks: dict[bytes, int]) -> str:
    return hashlib.sha256(ranks_to_text(ranks).encode("ascii")).hexdigest()


def merges_sha256(merges: list[tuple[str, str]]) -> str:
    return hashlib.sha256("\n".join(f"{a} {b}" for a, b in merges).encode("utf-8")).hexdigest()


def is_gpt2(tok) -> bool:
    """Whether tok is GPT-2's encoding exactly (ranks, split pattern, special tokens)."""
    return (isinstance(tok, TiktokenTokenizer) and tok.pattern == GPT2_SPLIT_PATTERN
            and tok.special_tokens == {EOT: 50256} and ranks_sha256(tok.ranks) == GPT2_RANKS_SHA256)


# ---------------------------------------------------------------------------------------------
# Reading


def _token_content(value) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_hf_tokenizer(folder: Path, eos_id: int | None = None) -> TiktokenTokenizer | CharTokenizer:
    """The tokenizer a Hugging Face model folder ships, as tiktoken ranks (or, for the word-level
    file a char tokenizer exports as, the char tokenizer); `eos_id` (config.json's) names the
    end-of-text token when tokenizer_config.json does not."""
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if (folder / "tokenizer.json").is_file():
        where = folder / "tokenizer.json"
        data = _read_json(where)
        if (data.get("model") or {}).get("type") == "WordLevel":
            return _read_char_tokenizer(data, _token_content(config.get("eos_token")), where)
        vocab, merges, added, pattern = _read_bpe_json(data, where)
        whole_pieces = bool(data["model"].get("ignore_merges"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _read_json(folder / "vocab.json")
        merges = _read_merges_txt(folder / "merges.txt")
        added, pattern, where, whole_pieces = {}, GPT2_SPLIT_PATTERN, folder / "vocab.json", False
    else:
        raise UserError(f"{folder}: no tokenizer (expected tokenizer.json, or vocab.json + merges.txt); only "
                        f"byte-level BPE tokenizers convert")
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        if _token_content(token) is not None and str(key).isdigit():
            added[_token_content(token)] = int(key)
    ranks, special = _split_vocab(vocab, merges, added, where, whole_pieces)
    name, known_pattern, known_merges = KNOWN_ENCODINGS.get(ranks_sha256(ranks), ("hf-bpe", None, None))
    if pattern != known_pattern or merges_sha256(merges) != known_merges:
        name = "hf-bpe"
        _check_merges(ranks, merges, where)
    eot = _token_content(config.get("eos_token"))
    if eot is None and eos_id is not None:
        eot = next((t for t, i in special.items() if i == eos_id), None)
    eot = eot if eot in special else EOT
    try:
        return TiktokenTokenizer(name, ranks, pattern, special, eot)
    except ValueError as e:  # tiktoken's regex engine refused the pattern, or ids collide
        raise UserError(f"{where}: tiktoken cannot use this tokenizer ({str(e).splitlines()[0][:160]})") from None


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{path}: malformed merge line {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_char_tokenizer(data: dict, eos: str | None, path: Path) -> CharTokenizer:
    vocab = data["model"].get("vocab") or {}
    chars = sorted(vocab, key=vocab.get)
    if any(len(c) != 1 for c in chars) or data != _char_tokenizer_json(CharTokenizer("".join(chars))):
        raise UserError(f"{path}: a word-level tokenizer that is not one token per character; only byte-level BPE "
                        f"and the char tokenizer convert")
    return CharTokenizer("".join(chars), eos if eos in vocab else None)


def _read_bpe_json(data: dict, path: Path):
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise UserError(f"{path}: a {kind} tokenizer; only byte-level BPE converts to tiktoken ranks")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{path}: a SentencePiece/WordPiece-style BPE (byte_fallback or subword affixes); only "
                        f"byte-level BPE converts to tiktoken ranks")
    if data.get("normalizer") is not None:
        raise UserError(f"{path}: it normalises text first ({data['normalizer'].get('type')}); tiktoken cannot")
    pattern = _split_pattern(data.get("pre_tokenizer"), path)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{path}: malformed merges")
    added = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
    return model.get("vocab") or {}, merges, added, pattern


def _split_pattern(pre: dict | None, path: Path) -> str:
    """The regex that cuts text into pieces before BPE, from a byte-level pre-tokenizer."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space")

    if pre and byte_level(pre) and pre.get("use_regex", True):
        return GPT2_SPLIT_PATTERN
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in (steps[0].get("pattern") or {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and byte_level(steps[1]) and not steps[1].get("use_regex", True)):
        regex = steps[0]["pattern"]["Regex"]
        return {onig_pattern(p): p for p in GGUF_PRE_TOKENIZERS}.get(regex, regex)  # ours, as tiktoken spells it
    kind = pre.get("type") if pre else None
    raise UserError(f"{path}: pre_tokenizer {kind} is not a byte-level split tiktoken can run (expected ByteLevel, "
                    f"or Split(Regex) then ByteLevel, without a prefix space)")


def _split_vocab(vocab: dict, merges: list[tuple[str, str]], added: dict, where: Path, whole_pieces: bool):
    """(ranks, special tokens by id): the ranks are the 256 bytes and what the merges make; every
    other entry (`<|endoftext|>`, added tokens) is a special token, which ordinary text never
    encodes to, under either library. Except where the file looks a whole piece up before merging
    (`ignore_merges`, as tiktoken does): there a byte-level token no merge makes would be reached
    by the file and not by the ranks, so it is refused."""
    made = set()
    for a, b in merges:
        left, right = unspell(a), unspell(b)
        if left is None or right is None:
            raise UserError(f"{where}: merge {a!r} {b!r} is not spelled in the byte-level alphabet")
        made.add(left + right)
    ranks, special = {}, dict(added)
    for token, idx in vocab.items():
        raw = unspell(token) if token not in added else None
        if raw is not None and (len(raw) == 1 or raw in made):
            ranks[raw] = idx
        elif raw is not None and whole_pieces:
            raise UserError(f"{where}: token {token!r} (id {idx}) is made by no merge but matched whole "
                            f"(ignore_merges); tiktoken ranks cannot reproduce it")
        else:
            special[token] = idx
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{where}: not a byte-level BPE: {len(missing)} of the 256 byte tokens are missing "
                        f"(e.g. byte {missing[0]})")
    if made - ranks.keys():
        raise UserError(f"{where}: merge making {spell(next(iter(made - ranks.keys())))!r} has no vocabulary entry")
    if len(set(ranks.values()) | set(special.values())) != len(ranks) + len(special):
        raise UserError(f"{where}: two tokens share an id")
    return ranks, special


def _check_merges(ranks: dict[bytes, int], merges: list[tuple[str, str]], where: Path):
    """Refuse merges that tiktoken's rank order would not reproduce (see the module docstring)."""
    listed, last = {}, -1
    for a, b in merges:
        token = unspell(a) + unspell(b)
        listed.setdefault(token, (unspell(a), unspell(b)))
        if ranks[token] <= last:
            raise UserError(f"{where}: merges are not in the order of the ids they make (merge {a!r} {b!r} makes id "
                            f"{ranks[token]} after id {last}); tiktoken ranks cannot reproduce it")
        last = ranks[token]
    for token, (left, right) in listed.items():
        if bpe_split(ranks, token, ranks[token]) != [left, right]:
            raise UserError(f"{where}: token {spell(token)!r} (id {ranks[token]}) is listed as the merge "
                            f"{spell(left)!r} {spell(right)!r}, but lower-ranked tokens merge its bytes otherwise; "
                            f"tiktoken ranks cannot reproduce it")


# ---------------------------------------------------------------------------------------------
# Writing


def onig_pattern(pattern: str) -> str:
    """A tiktoken (fancy-regex) split pattern in Oniguruma's dialect; see the module docstring."""
    out, i, in_class, quantified = [], 0, False, False  # quantified: the last piece was a quantifier
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":  # an escape; \p{...} whole
            piece, quantified = re.match(r"\\[pP]\{[^}]*\}|\\.", pattern[i:], re.S).group(0), False
        elif in_class:
            piece, in_class = c, c != "]"
        elif c == "+" and quantified:  # possessive: dropped
            i, quantified = i + 1, False
            continue
        elif c in "*+" or (c == "?" and not (out and out[-1] == "(")):
            piece, quantified = c, not (c == "?" and quantified)  # a `?` after a quantifier makes it lazy
        elif c == "{" and (m := re.match(r"\{\d+(,\d*)?\}", pattern[i:])):
            piece, quantified = m.group(0), True
        elif c == "$":
            out.append("\\z")
            i, quantified = i + 1, False
            continue
        else:
            piece, quantified, in_class = c, False, c == "["
        out.append(piece)
        i += len(piece)
    return "".join(out)


def _bpe_tokenizer_json(tok: TiktokenTokenizer) -> dict:
    vocab = {spell(token): rank for token, rank in tok.ranks.items()}
    merges = [[spell(a), spell(b)] for a, b in merges_from_ranks(tok.ranks)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in sorted(tok.special_tokens.items(),
                                                                                  key=lambda item: item[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(tok.pattern)}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        # ignore_merges: a piece that is a whole token is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def _char_tokenizer_json(tok: CharTokenizer) -> dict:
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        # (?m:.) is any character, newlines included, in Oniguruma's (Ruby) syntax
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?m:.)"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)}, "unk_token": "[UNK]"},
    }


def write_hf_tokenizer(tok, folder: Path, max_length: int) -> list[str]:
    """Write `tok` as Hugging Face tokenizer files into folder; returns the file names."""
    eot = None if tok.eot_id is None else (tok.separator if isinstance(tok, CharTokenizer) else tok.eot)
    config = {"model_max_length": max_length, "clean_up_tokenization_spaces": False, "add_bos_token": False,
              "add_eos_token": False}
    if eot is not None:
        config.update(bos_token=eot, eos_token=eot)
    files = ["tokenizer_config.json"]
    if is_gpt2(tok):
        vocab = {spell(token): rank for token, rank in tok.ranks.items()} | {EOT: 50256}
        merges = "".join(f"{spell(a)} {spell(b)}\n" for a, b in merges_from_ranks(tok.ranks))
        atomic_write(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        atomic_write(folder / "merges.txt", "#version: 0.2\n" + merges)
        config.update(tokenizer_class="GPT2Tokenizer", unk_token=EOT, add_prefix_space=False)
        files += ["vocab.json", "merges.txt"]
    else:
        body = _char_tokenizer_json(tok) if isinstance(tok, CharTokenizer) else _bpe_tokenizer_json(tok)
        atomic_write(folder / "tokenizer.json", json.dumps(body, ensure_ascii=False))
        config.update(tokenizer_class="PreTrainedTokenizerFast")
        files.append("tokenizer.json")
    atomic_write(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    return files


def check_gguf_tokenizer(tok):
    """Refuse a tokenizer llama.cpp has no form for."""
    if not isinstance(tok, TiktokenTokenizer):
        raise UserError("the char tokenizer has no llama.cpp equivalent (its GGUF tokenizers are byte-level BPE or "
                        "SentencePiece); export it with --format hf, or train with a BPE tokenizer")
    if tok.pattern not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"tokenizer {tok.name}: llama.cpp knows no pre-tokenizer for its split pattern "
                        f"{tok.pattern[:60]!r}...; export it with --format hf")


def gguf_vocab(tok, vocab_rows: int) -> dict:
    """llama.cpp's tokenizer metadata for a byte-level BPE: model, pre-tokenizer name, tokens (one
    per embedding row), their types (1 normal, 3 control, 5 unused), merges, the end-of-text id."""
    check_gguf_tokenizer(tok)
    pre = GGUF_PRE_TOKENIZERS[tok.pattern]
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [5] * vocab_rows  # 5: unused
    for token, rank in tok.ranks.items():
        tokens[rank], types[rank] = spell(token), 1
    for token, idx in tok.special_tokens.items():
        tokens[idx], types[idx] = token, 3
    merges = [f"{spell(a)} {spell(b)}" for a, b in merges_from_ranks(tok.ranks)]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "eot_id": tok.eot_id}

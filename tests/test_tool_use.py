"""Tool use: the template's tool turns (outputs never trained), generation that runs tool calls
(chat/agent.py) with and without the KV cache and batched as alone, and the tasks that use them."""

import json
import re

import pytest
import torch

import evaluate
from chat.agent import final_text, generate_turn, turn_messages
from chat.tasks import answer, column_addition, generate as make_task, is_padded
from chat.template import ChatTemplate
from chat.tools import calculate
from data.tokenizer import CharTokenizer, with_chat_tokens
from model import GPT, GPTConfig
from model.generate import Sampling

TEXT = "0123456789 +-*/=().,;:abcdefghijklmnopqrstuvwxyz?'WCAMS"


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(with_chat_tokens(CharTokenizer.from_text(TEXT)))


def tool_conversation(call="1234*567"):
    return [{"role": "user", "content": f"what is {call}?"},
            {"role": "assistant", "content": "let me see", "tool_call": call},
            {"role": "tool", "content": calculate(call)},
            {"role": "assistant", "content": f"it is {calculate(call)}"}]


def test_tool_outputs_are_context_and_calls_are_learned(template):
    messages = tool_conversation()
    ids, mask = template.render(messages)
    decode = template.tokenizer.decode
    assert decode(ids) == ("<|bos|><|user_start|>what is 1234*567?<|user_end|><|assistant_start|>let me see"
                           "<|tool_call_start|>1234*567<|tool_call_end|><|tool_output_start|>699678<|tool_output_end|>"
                           "it is 699678<|assistant_end|>")
    assert decode([i for i, m in zip(ids, mask) if m]) == (
        "let me see<|tool_call_start|>1234*567<|tool_call_end|>it is 699678<|assistant_end|>")
    # Generation after the tool message goes on in the same turn: a prefix of the training render.
    prompt = template.render_for_generation(messages[:3])
    assert ids[:len(prompt)] == prompt and ids[len(prompt)] == template.tokenizer.encode("i")[0]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "1"},
      {"role": "assistant", "content": "c"}], "a tool message must follow an assistant tool_call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_call": "1+1"},
      {"role": "user", "content": "c"}, {"role": "assistant", "content": "c"}], "must be followed by a tool message"),
    ([{"role": "user", "content": "a", "tool_call": "1"}, {"role": "assistant", "content": "b"}], "tool_call must be"),
])
def test_bad_tool_turns_are_refused(template, messages, error):
    from chat.template import ConversationError

    with pytest.raises(ConversationError, match=error):
        template.render(messages)


class Scripted(torch.nn.Module):
    """A real GPT whose first reply tokens are pushed to a per-row script (a tool call), so that
    what follows the forced output comes from the GPT itself, through its KV cache or not. Rows
    are told apart by their third token (the question's first letter)."""

    def __init__(self, gpt, scripts: dict[int, list[int]], prompt_len: int):
        super().__init__()
        self.gpt, self.scripts, self.prompt_len = gpt, scripts, prompt_len

    def decoder(self, use_cache=True, decode="dynamic", max_len=0):
        inner, outer = self.gpt.decoder(use_cache, decode, max_len), self

        class Decoder:
            def next_logits(self, tokens):
                logits = inner.next_logits(tokens).clone()
                k = tokens.shape[1] - outer.prompt_len
                for r in range(tokens.shape[0]):
                    script = outer.scripts[int(tokens[r, 2])]
                    if k < len(script):
                        logits[r, script[k]] = 1e4
                return logits

        return Decoder()


CALLS = ["12*34", "7//0", "2**3**2", "1+"]


@pytest.fixture(scope="module")
def scripted(template):
    enc, ids = template.tokenizer.encode, template.special_ids
    prompts = [template.render_for_generation([{"role": "user", "content": f"{c}?"}]) for c in "abcd"]
    scripts = {p[2]: [ids["<|tool_call_start|>"], *enc(c), ids["<|tool_call_end|>"]] for p, c in zip(prompts, CALLS)}
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=template.tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    return prompts, Scripted(gpt, scripts, len(prompts[0]))


def run(template, scripted, rows, use_cache=True, tools=True):
    prompts, model = scripted
    idx = torch.tensor([prompts[r] for r in rows])
    sampling = Sampling(temperature=0, vocab_limit=template.tokenizer.vocab_size)
    return generate_turn(model, template, idx, 50, sampling, tools=tools, use_cache=use_cache)


def test_a_tool_call_gets_its_output_forced_into_its_own_row(template, scripted):
    turns = run(template, scripted, range(4))
    decode = template.tokenizer.decode
    for call, turn in zip(CALLS, turns):
        text = decode(turn)
        expected = f"<|tool_call_start|>{call}<|tool_call_end|><|tool_output_start|>{calculate(call)}<|tool_output_end|>"
        assert text.startswith(expected), text
        messages = turn_messages(template, turn)
        assert messages[:2] == [{"role": "assistant", "content": "", "tool_call": call},
                                {"role": "tool", "content": calculate(call)}]
        assert final_text(template, turn) == messages[-1]["content"]
    assert "error: division by zero" in decode(turns[1]) and "error: not an arithmetic expression" in decode(turns[3])


def test_tool_generation_is_the_same_with_and_without_cache_and_batched_as_alone(template, scripted):
    batched = run(template, scripted, range(4))
    assert run(template, scripted, range(4), use_cache=False) == batched
    for r in range(4):
        assert run(template, scripted, [r]) == [batched[r]]
    assert any(len(t) > 20 for t in batched)  # the GPT wrote on after the output


def test_no_tools_forces_nothing(template, scripted):
    with_tools, without = run(template, scripted, range(4)), run(template, scripted, range(4), tools=False)
    for call, a, b in zip(CALLS, with_tools, without):
        n = len(template.tokenizer.encode(call)) + 2  # the scripted call, the same in both
        assert a[:n] == b[:n] and a[n:n + 3] != b[n:n + 3]
        assert calculate(call) not in template.tokenizer.decode(b[n:])


def test_evaluate_scores_tool_answers_by_their_final_text(template):
    records = [(r, f"t.jsonl:{i}") for i, r in enumerate(make_task("multiply_tool", 4, 0, "test"))]
    for record, _ in records:
        m = record["messages"]
        assert m[-3]["tool_call"] and m[-2]["role"] == "tool" and m[-2]["content"] == calculate(m[-3]["tool_call"])
        assert evaluate.prompt_messages(m) == m[:-3]
    plain = make_task("multiply", 4, 0, "test")
    assert [r["messages"][-1] for r in plain] == [r["messages"][-1] for r, _ in records]  # the same questions
    results = evaluate.score(records, [r["messages"][-1]["content"] for r, _ in records])
    assert all(r["correct"] for r in results)


def test_column_addition_works_out_the_sum():
    assert column_addition(958, 67) == "8+7+0=15, 5+6+1=12, 9+0+1=10; 958 + 67 = 1025"
    cot, bare = make_task("addition_cot", 20, 3, "test", digits=6), make_task("addition", 20, 3, "test", digits=6)
    for c, b in zip(cot, bare):
        assert c["messages"][:-1] == b["messages"][:-1]  # the same questions
        assert c["messages"][-1]["content"].endswith(b["messages"][-1]["content"])


def test_preference_pairs_prefer_the_right_sum():
    for pair in make_task("preference_correct", 50, 0, "train"):
        assert set(pair) == {"prompt", "chosen", "rejected", "task"}
        a, b, right = (int(x) for x in pair["chosen"].replace("+", "=").split("="))
        assert a + b == right and pair["rejected"] != pair["chosen"]
        assert pair["rejected"].startswith(f"{a} + {b} = ") and json.dumps(pair)


def test_preference_pairs_prefer_the_concise_reply():
    for pair in make_task("preference", 50, 0, "test"):
        a, b, right = (int(x) for x in pair["chosen"].replace("+", "=").split("="))
        assert a + b == right and not is_padded(pair["chosen"]) and is_padded(pair["rejected"])
        assert pair["chosen"] in pair["rejected"]  # the same answer, padded
        assert answer("addition", pair["rejected"]) == answer("addition", pair["chosen"]) == str(right)
    chatty = [c["messages"][-1]["content"] for c in make_task("addition_chatty", 400, 0, "train")]
    assert 0.8 < sum(map(is_padded, chatty)) / len(chatty) < 0.97  # mostly padded, as the SFT data DPO corrects
    test = [c for c in make_task("addition_chatty", 50, 0, "test") if is_padded(c["messages"][-1]["content"])]
    concise = [re.search(r"\d+ \+ \d+ = \d+", c["messages"][-1]["content"]).group() for c in test]
    assert all(r["correct"] for r in evaluate.score([(c, 1) for c in test], concise))  # a concise reply scores
    wrong = [reply[:-1] + str((int(reply[-1]) + 1) % 10) for reply in concise]
    assert not any(r["correct"] for r in evaluate.score([(c, 1) for c in test], wrong))

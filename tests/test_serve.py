"""serve.py as users use it: a real server on a free loopback port, spoken to with the official
`openai` package (completions and chat, streamed and not, n > 1, stop, seed) and with raw HTTP
for the errors, the key, the queue bound and disconnects; its start-up and shutdown; the chat
page in a real headless Chromium.

The model is a tiny GPT with random weights and a char tokenizer with the chat tokens. Its head
is arranged so that it never emits a special token (end of text, assistant end): every answer
runs to max_tokens, so lengths and finish reasons are known in advance."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the test extra is not installed: pip install -e '.[test]'")

from chat.template import ChatTemplate  # noqa: E402
from data.tokenizer import CharTokenizer, with_chat_tokens  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.config import Config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BLOCK = 64


def write_checkpoint(path: Path, chat: bool) -> Path:
    tokenizer = CharTokenizer(CHARS, separator="\x03")
    if chat:
        tokenizer = with_chat_tokens(tokenizer)
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32,
                          tie_weights=False)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        # Feature 0 of the final norm's output is always 10; the head reads it only for the
        # special ids, strongly negatively: they are never drawn.
        model.ln_f.weight[0], model.ln_f.bias[0] = 0.0, 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[len(CHARS):, 0] = -10.0
        model.lm_head.weight[tokenizer.eot_id, 0] = -10.0
    path.mkdir(parents=True)
    save_checkpoint(dict(model=model.state_dict(), config=cfg.to_dict(), tokenizer=tokenizer.state(), iter=0),
                    path / "latest.pt")
    return path


def launch(ckpt: Path, log: Path, *args: str) -> subprocess.Popen:
    """serve.py on a free loopback port (--port 0: it prints the one it got), logging to `log`."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt", str(ckpt), "--port", "0", "--threads", "1",
                                 "--device", "cpu", *args], cwd=REPO, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.log = log
    return proc


def address(proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 120
    while not (match := re.search(r"on (http://127\.0\.0\.1:\d+)", proc.log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.log.read_text()}")
        time.sleep(0.05)
    return match[1]


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM, wait; its log."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.log.read_text()


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "chat-run", chat=True)


@pytest.fixture(scope="module")
def servers(chat_ckpt, tmp_path_factory):
    """Two servers, started side by side: the chat model with a key and small limits, and a
    plain model (no chat tokens) that ends running requests at once on SIGTERM."""
    tmp = tmp_path_factory.mktemp("serve")
    procs = {"chat": launch(chat_ckpt, tmp / "chat.log", "--api-key", KEY, "--max-batch", "4", "--max-queue", "2",
                            "--max-tokens", "100000", "--max-body", "4096"),
             "plain": launch(write_checkpoint(tmp / "base", chat=False), tmp / "plain.log", "--grace", "0",
                             "--max-tokens", "100000")}
    try:
        yield {name: (proc, address(proc)) for name, proc in procs.items()}
    finally:
        logs = [stop_server(proc) for proc in procs.values()]
    assert not any("Traceback" in log for log in logs), logs


@pytest.fixture(scope="module")
def server(servers):
    return servers["chat"][1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body: bytes | str | None = None, key: str | None = KEY, headers=None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return resp.status, dict(resp.getheaders()), data


def test_models_health_page_and_the_key(server, client):
    assert [m.id for m in client.models.list()] == ["chat-run"]
    status, _, health = raw(server, "GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok" and health["chat"] and health["auth"]
    status, headers, page = raw(server, "GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and "<title>" in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched from elsewhere
    for key in (None, "wrong"):
        status, _, body = raw(server, "GET", "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_one_log_line_per_request(servers, client):
    client.completions.create(model="m", prompt="Hello", max_tokens=7)
    raw(servers["chat"][1], "GET", "/v1/models", key=None)
    log = servers["chat"][0].log  # client, method, path, status, prompt+completion tokens, latency
    for line in (r'^127\.0\.0\.1 "POST /v1/completions" 200 tokens=5\+7 \d+\.\d{3}s$',
                 r'^127\.0\.0\.1 "GET /v1/models" 401 tokens=- \d+\.\d{3}s$'):
        wait_for(lambda: re.search(line, log.read_text(), re.M))  # written once the response has ended


def test_completion_streamed_equals_plain_at_temperature_0(client):
    plain = client.completions.create(model="m", prompt="ROMEO:", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="ROMEO:", max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    choice = plain.choices[0]
    assert len(choice.text) == 30 and choice.finish_reason == "length"  # char level: a token is a character
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (6, 30, 36)
    assert chunks[-1].usage.total_tokens == 36 and not chunks[-1].choices


def test_chat_streamed_equals_plain(client, chat_ckpt):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=25, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=25, temperature=0,
                                                 stream=True))
    message = plain.choices[0].message
    assert message.role == "assistant" and len(message.content) == 25 and plain.choices[0].finish_reason == "length"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    tokenizer = CharTokenizer(CHARS, separator="\x03")
    assert plain.usage.prompt_tokens == len(ChatTemplate(with_chat_tokens(tokenizer)).render_for_generation(messages))


def test_n_choices_seed_and_stop(client):
    def texts(n, seed, stream=False):
        got = client.completions.create(model="m", prompt="KING:", max_tokens=20, temperature=1.0, n=n, seed=seed,
                                        stream=stream)
        if not stream:
            assert [c.index for c in got.choices] == list(range(n))
            return [c.text for c in got.choices]
        out = [""] * n
        for chunk in got:
            for c in chunk.choices:
                out[c.index] += c.text
        return out

    first = texts(3, 11)
    assert len(set(first)) == 3 and all(len(t) == 20 for t in first)
    assert texts(3, 11) == first  # the same seed, the same texts
    assert texts(2, 11, stream=True) == first[:2]  # choice i draws from seed + i, streamed or not
    assert texts(3, 12) != first

    greedy = client.completions.create(model="m", prompt="KING:", max_tokens=20, temperature=0).choices[0].text
    stop = greedy[9:11]
    cut = client.completions.create(model="m", prompt="KING:", max_tokens=20, temperature=0, stop=["zzz", stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_a_seeded_choice_is_what_sample_py_gives(client, chat_ckpt, capsys):
    import sample

    sample.main(["--ckpt", str(chat_ckpt), "--prompt", "KING:", "--max-new-tokens", "20", "--temperature", "1.0",
                 "--top-k", "0", "--seed", "11", "--device", "cpu"])
    text = client.completions.create(model="m", prompt="KING:", max_tokens=20, temperature=1.0, seed=11).choices[0].text
    assert capsys.readouterr().out == "KING:" + text + "\n"


BAD = [  # (path, body, the parameter named, the code)
    ("/v1/completions", '{"prompt": "a",', None, "invalid_json"),
    ("/v1/completions", '{"prompt": "a", "temperature": NaN}', None, "invalid_json"),
    ("/v1/completions", '["a"]', None, "invalid_json"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": "5"}', "max_tokens", "invalid_type"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 100001}', "max_tokens", "invalid_value"),
    ("/v1/completions", '{"prompt": "a", "temperature": 2.5}', "temperature", "invalid_value"),
    ("/v1/completions", '{"prompt": "a", "top_p": 0}', "top_p", "invalid_value"),
    ("/v1/completions", '{"prompt": "a", "n": 5}', "n", "invalid_value"),
    ("/v1/completions", '{"prompt": "a", "stream": "yes"}', "stream", "invalid_type"),
    ("/v1/completions", '{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', "stop", "invalid_value"),
    ("/v1/completions", '{"prompt": "a", "seed": -1}', "seed", "invalid_value"),
    ("/v1/completions", '{"prompt": "a", "logprobs": 3}', "logprobs", "unsupported_parameter"),
    ("/v1/completions", '{"prompt": 5}', "prompt", "invalid_type"),
    ("/v1/completions", '{"max_tokens": 5}', "prompt", "missing_required_parameter"),
    ("/v1/completions", json.dumps({"prompt": "a" * (BLOCK + 1)}), "prompt", "context_length_exceeded"),
    ("/v1/completions", json.dumps({"prompt": "caf\u00e9"}), "prompt", "invalid_value"),
    ("/v1/completions", json.dumps({"prompt": [1, 2, 10 ** 6]}), "prompt", "invalid_value"),
    ("/v1/completions", json.dumps({"prompt": "a" * 5000}), None, "request_too_large"),
    ("/v1/chat/completions", '{"messages": "hi"}', "messages", "invalid_type"),
    ("/v1/chat/completions", '{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", '{"messages": [{"role": "assistant", "content": "hi"}]}', "messages", "invalid_value"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     "tools", "unsupported_parameter"),
]


@pytest.mark.parametrize("path,body,param,code", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_with_openai_error_object(server, path, body, param, code):
    status, _, data = raw(server, "POST", path, body)
    assert status == 400, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code) and error["message"]


def test_unknown_route_and_method(server):
    status, _, data = raw(server, "GET", "/v1/engines")
    assert status == 404 and "error" in data
    status, _, data = raw(server, "GET", "/v1/completions")
    assert status == 405 and "error" in data


def open_stream(url, body: dict) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    return conn


def health(url) -> dict:
    return raw(url, "GET", "/health", key=None)[2]


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_full_queue_gets_429_and_disconnects_free_the_rows(server, client):
    busy = open_stream(server, {"prompt": "A", "max_tokens": 100000, "n": 4})  # every row, for long enough
    wait_for(lambda: health(server)["running"] == 4)
    queued = [open_stream(server, {"prompt": "B", "max_tokens": 5}) for _ in range(2)]  # the queue's limit
    wait_for(lambda: health(server)["waiting"] == 2)
    status, headers, data = raw(server, "POST", "/v1/completions", '{"prompt": "C", "max_tokens": 5}')
    assert status == 429 and headers["retry-after"] == "1" and data["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="m", prompt="C", max_tokens=5)
    for conn in queued:  # clients that go away before their turn free their places in the queue
        conn.close()
    wait_for(lambda: health(server)["waiting"] == 0)
    assert health(server)["running"] == 4
    busy.close()  # and a running one its rows
    wait_for(lambda: health(server)["running"] == 0)
    host, port = server.removeprefix("http://").split(":")
    plain = http.client.HTTPConnection(host, int(port), timeout=60)  # a plain (not streamed) request too
    plain.request("POST", "/v1/completions", json.dumps({"prompt": "E", "max_tokens": 100000}),
                  {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    wait_for(lambda: health(server)["running"] == 1)
    plain.close()
    wait_for(lambda: health(server)["running"] == 0)
    assert client.completions.create(model="m", prompt="D", max_tokens=5).choices[0].finish_reason == "length"


def test_plain_model_refuses_chat_and_sigterm_ends_running_streams(servers):
    proc, url = servers["plain"]
    status, _, data = raw(url, "POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}]}',
                          key=None)
    assert status == 400 and data["error"]["code"] == "model_not_chat"
    conn = open_stream(url, {"prompt": "A", "max_tokens": 100000})
    resp = conn.sock.makefile("rb")
    assert resp.readline()  # the stream is running
    proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()
    assert '"error"' in rest and "shutting down" in rest  # ended with an error event, not cut off
    assert proc.wait(timeout=30) == 0
    assert "stopped" in stop_server(proc)


def test_bad_checkpoint_fails_before_binding_and_busy_port_is_named(tmp_path, chat_ckpt, capsys):
    import serve

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for ckpt, line in ((bad, f"error: {bad}: corrupt or truncated checkpoint (not a complete torch.save archive)"),
                           (chat_ckpt, f"error: port {port} on 127.0.0.1 is in use; pick another with --port")):
            with pytest.raises(SystemExit) as exit:
                serve.main(["--ckpt", str(ckpt), "--port", port, "--device", "cpu"])
            assert exit.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [line]


# The chat page in a real browser ----------------------------------------------------------------

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    import tempfile

    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_chat_page_streams_stops_and_starts_a_new_chat(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    find = browser.find_element
    browser.get(server + "/")
    wait.until(lambda d: "chat-run" in find(By.ID, "model").text)
    wait.until(lambda d: find(By.ID, "api-key").is_displayed())  # /health says a key is needed
    find(By.ID, "api-key").send_keys(KEY)

    def set_value(element_id, value):
        box = find(By.ID, element_id)
        box.clear()
        box.send_keys(value)

    # A long answer: watch it grow while it streams, then stop it.
    set_value("max-tokens", "4000")
    find(By.ID, "prompt").send_keys("Tell me a long story\n")
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant.streaming"))
    lengths = set()

    def grew_twice(_):
        lengths.add(len(answer.text))
        return len(lengths - {0}) >= 3  # three different lengths seen: it streamed

    wait.until(grew_twice)
    assert find(By.ID, "stop").is_enabled() and not find(By.ID, "send").is_enabled()
    find(By.ID, "stop").click()
    wait.until(lambda d: "(stopped)" in answer.text)
    wait.until(lambda d: health(server)["running"] == 0)  # the server cancelled the row
    assert find(By.ID, "send").is_enabled() and not find(By.ID, "stop").is_enabled()

    # A new chat forgets the conversation; a short answer then runs to its end.
    find(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
    set_value("system", "You are a helpful assistant.")
    set_value("temperature", "0")
    set_value("max-tokens", "40")
    find(By.ID, "prompt").send_keys("Hello, who are you?\n")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant")
               and not d.find_elements(By.CSS_SELECTOR, ".streaming"))
    replies = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
    assert len(replies) == 1 and len(replies[0].text) == 40 and not browser.find_elements(By.CSS_SELECTOR, ".error")
    greedy = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model="m", max_tokens=40, temperature=0, messages=[{"role": "system", "content": "You are a helpful assistant."},
                                                           {"role": "user", "content": "Hello, who are you?"}])
    assert replies[0].text == greedy.choices[0].message.content  # the page sent what its controls say
    browser.save_screenshot(str(Path(os.environ.get("SERVE_SCREENSHOT", tmp_path / "chat.png"))))

    # A server error reads as a sentence: the key is wrong.
    set_value("api-key", "wrong")
    find(By.ID, "prompt").send_keys("Again\n")
    error = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".error"))
    assert "API key" in error.text

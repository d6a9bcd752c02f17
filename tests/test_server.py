"""``mamba2 serve`` as a user runs it: real server processes on free ports, spoken to with the ``openai`` client and
httpx. Every greedy answer is checked against an in-process engine with one slot (each request alone)."""

from __future__ import annotations

import json
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import child_env
from mamba2 import Mamba2Config, Mamba2LM
from mamba2.cli import main
from mamba2.interop import load, save_pretrained
from mamba2.serving import Engine, SamplingParams
from mamba2.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
EOS_PROMPT = "ab"          # the fixture makes this prompt's greedy continuation end with EOS
PREFIX = "You are a helpful assistant.\n"      # the main server keeps this prefix's state


def byte_level_tokenizer(path: Path) -> Path:
    """A Hugging Face byte-level tokenizer.json: one token per byte (GPT-2's byte-to-char map), EOS as id 256.
    A cut multi-byte character decodes to U+FFFD, as with real byte-level BPE vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    tok = Tokenizer(models.BPE(vocab={**{chars[b]: b for b in range(256)}, EOS: 256}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    tok.save(str(path))
    return path


def greedy_alone(engine: Engine, ids: list[int], max_tokens: int, stop_ids: tuple[int, ...]) -> list[int]:
    engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids))
    out: list[int] = []
    while engine.has_work():
        for o in engine.step():
            out.extend(o.new_tokens)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Mamba-2 (varied weights, so that outputs depend on the prompt) whose EOS row copies, scaled
    up, the row of a token that the greedy continuation of EOS_PROMPT produces: that continuation ends with EOS."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = load_tokenizer(byte_level_tokenizer(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        ids = tokenizer.encode(EOS_PROMPT)
        out = greedy_alone(Engine(model, max_batch=1, vocab_size=256), ids, 12, ())   # EOS never drawn
        model.lm_head.weight[tokenizer.eos_token_id] = model.lm_head.weight[out[8]] * 1.5
    return save_pretrained(model, root / "tiny", tokenizer=tokenizer)


class Oracle:
    """Greedy answers of the checkpoint, each request alone (an engine with one slot), as the server words them."""

    def __init__(self, checkpoint: Path):
        loaded = load(checkpoint)
        self.tokenizer, self.eos = loaded.tokenizer, loaded.tokenizer.eos_token_id
        self.engine = Engine(loaded.model, max_batch=1, vocab_size=self.tokenizer.vocab_size)
        self.cache: dict[tuple[str, int], dict] = {}

    def __call__(self, prompt: str, max_tokens: int) -> dict:
        """{"text", "finish_reason", "tokens"} of the greedy completion."""
        key = (prompt, max_tokens)
        if key not in self.cache:
            out = greedy_alone(self.engine, self.tokenizer.encode(prompt), max_tokens, (self.eos,))
            stopped = bool(out) and out[-1] == self.eos
            self.cache[key] = {"text": self.tokenizer.decode(out[:-1] if stopped else out), "tokens": len(out),
                               "finish_reason": "stop" if stopped else "length"}
        return self.cache[key]


@pytest.fixture(scope="module")
def oracle(checkpoint):
    return Oracle(checkpoint)


class Server:
    """A ``mamba2 serve`` process on a free port; ``url`` once it has printed its ready line."""

    def __init__(self, checkpoint: Path, *flags, log: Path):
        env = child_env()
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "mamba2", "serve", "--checkpoint", str(checkpoint),
                                      "--port", "0", *map(str, flags)], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=log.open("w"))
        self.url = ""

    def wait_ready(self, timeout: float = 60) -> "Server":
        deadline = time.monotonic() + timeout
        while not self.url:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                raise AssertionError(f"server did not start: {self.log.read_text()[-3000:]}")
            m = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
            self.url = m.group(1) if m else ""
        assert httpx.get(f"{self.url}/health").json()["status"] == "ok"
        return self

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def post(self, body, timeout: float = 60) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body)
        return httpx.post(f"{self.url}/v1/completions", content=content, timeout=timeout)

    def idle(self, timeout: float = 10) -> bool:
        """Polls /health until no request waits or runs; False at the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = httpx.get(f"{self.url}/health").json()
            if h["running"] == 0 and h["waiting"] == 0:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    """Three servers started together: ``main`` (4 slots, max len 512), ``small`` (1 slot, a queue of 2, a long
    max len, 1 s to finish at shutdown) and ``strict`` (a 1 s request timeout, bodies up to 16 KiB)."""
    logs = tmp_path_factory.mktemp("logs")
    specs = {"main": ("--max-batch", 4, "--max-len", 512, "--prefix", PREFIX),
             "small": ("--max-batch", 1, "--max-queue", 2, "--max-len", 10 ** 7, "--shutdown-timeout", 1),
             "strict": ("--max-batch", 2, "--max-len", 10 ** 7, "--request-timeout", 1, "--max-body-mb", 1 / 64)}
    started = {name: Server(checkpoint, *flags, log=logs / f"{name}.log") for name, flags in specs.items()}
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.close()


def random_prompt(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefgh ijk(){}:=\né€🙂") for _ in range(rng.randint(1, 30)))


def test_health_and_models(servers):
    s = servers["main"]
    assert httpx.get(f"{s.url}/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    for path in ("/health", "/v1/models"):
        head = httpx.head(f"{s.url}{path}")
        assert head.status_code == 200 and head.content == b"", path
    assert [m.id for m in s.client().models.list().data] == ["tiny"]
    r = httpx.get(f"{s.url}/v1/nothing")
    assert r.status_code == 404 and "Not Found" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="chat completions are not served.*POST /v1/completions"):
        s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_concurrent_requests_equal_each_request_alone(servers, oracle):
    """32 greedy requests from 32 threads, random prompts and lengths, arriving at random moments over 4 slots:
    each answer (text, finish reason, token count) is the request's answer alone."""
    client, rng = servers["main"].client(), random.Random(0)
    cases = [(random_prompt(rng), rng.randint(0, 48), rng.uniform(0, 0.3)) for _ in range(32)]

    def ask(case):
        prompt, max_tokens, delay = case
        time.sleep(delay)                       # staggered arrivals, not synchronisation
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, cases))
    for (prompt, max_tokens, _), a in zip(cases, answers):
        want = oracle(prompt, max_tokens)
        assert a.object == "text_completion" and a.model == "tiny" and len(a.choices) == 1
        assert (a.choices[0].text, a.choices[0].finish_reason) == (want["text"], want["finish_reason"]), prompt
        assert a.usage.completion_tokens == want["tokens"]
        assert a.usage.prompt_tokens == len(oracle.tokenizer.encode(prompt))


def test_prompts_starting_with_a_prefix_resume_from_its_state(servers, oracle):
    """--prefix: a prompt that starts with it prefills only the rest (usage says how many tokens were cached) and
    gets exactly what it gets alone; other prompts are untouched; a prompt equal to the prefix works too."""
    client = servers["main"].client()
    n_prefix = len(PREFIX.encode())          # the byte-level tokenizer: one token per byte
    for prompt, cached in ((PREFIX + "Say hi:", n_prefix), (PREFIX, n_prefix), ("Say hi:", 0),
                           (PREFIX[:-1], 0)):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == oracle(prompt, 12)["text"], prompt
        assert r.usage.prompt_tokens_details.cached_tokens == cached, prompt
    r = client.completions.create(model="tiny", prompt=[PREFIX + "a", PREFIX + "b"], max_tokens=4, temperature=0,
                                  n=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 2 * n_prefix and len(r.choices) == 4
    assert [c.text for c in r.choices] == [oracle(p, 4)["text"] for p in (PREFIX + "a",) * 2 + (PREFIX + "b",) * 2]


def test_eos_ends_a_request_with_stop_and_is_not_in_the_text(servers, oracle):
    want = oracle(EOS_PROMPT, 40)
    assert want["finish_reason"] == "stop" and want["tokens"] < 40
    a = servers["main"].client().completions.create(model="tiny", prompt=EOS_PROMPT, max_tokens=40, temperature=0)
    assert (a.choices[0].text, a.choices[0].finish_reason) == (want["text"], "stop") and EOS not in want["text"]


def test_streaming_yields_the_non_streaming_text(servers, oracle):
    """Chunk by chunk the text never shows half a character that a later token completes; joined, it is the
    non-streamed text. Several prompts in one request stream as interleaved choices; usage comes last."""
    s, rng = servers["main"], random.Random(1)
    prompts = [random_prompt(rng) for _ in range(6)] + [EOS_PROMPT]
    for p in prompts:
        chunks = list(s.client().completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == oracle(p, 40)["text"]
        assert [c.choices[0].finish_reason for c in chunks][-1] == oracle(p, 40)["finish_reason"]
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    stream = s.client().completions.create(model="tiny", prompt=prompts[:3], max_tokens=20, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    texts, chunks = ["", "", ""], list(stream)
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [oracle(p, 20)["text"] for p in prompts[:3]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(oracle(p, 20)["tokens"]
                                                                                   for p in prompts[:3])
    with httpx.stream("POST", f"{s.url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_stop_strings_cut_the_text(servers, oracle):
    s = servers["main"]
    prompt = next(p for p in (random_prompt(random.Random(i)) for i in range(100))
                  if len(oracle(p, 40)["text"]) > 12 and oracle(p, 40)["finish_reason"] == "length")
    full = oracle(prompt, 40)["text"]
    stop = full[6:9]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        res = s.client().completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                            stop=[stop, "\x00never"], stream=stream)
        chunks = list(res) if stream else [res]
        assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"
    a = s.client().completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop="\x00never")
    assert (a.choices[0].text, a.choices[0].finish_reason) == (full, "length")
    assert s.idle()


def test_several_prompts_token_ids_n_and_seeds(servers, oracle):
    s = servers["main"]
    ids = oracle.tokenizer.encode("def ")
    a = s.client().completions.create(model="tiny", prompt=[ids, "class "], max_tokens=10, temperature=0, n=2)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [oracle("def ", 10)["text"]] * 2 + [oracle("class ", 10)["text"]] * 2
    kw = dict(prompt="def ", max_tokens=20, temperature=1.0, top_k=50, top_p=0.9)
    x, y = (s.post({**kw, "seed": 7}).json()["choices"][0]["text"] for _ in range(2))
    assert x == y                                           # seeded sampling is reproducible across requests
    sampled = s.post({**kw, "seed": 7, "n": 3}).json()["choices"]
    assert sampled[0]["text"] == x and len({c["text"] for c in sampled}) > 1   # choice j uses seed + j


def test_200_requests_from_16_clients_all_complete(servers, oracle):
    s, rng = servers["main"], random.Random(2)
    prompts = [random_prompt(rng) for _ in range(10)]
    cases = [(rng.choice(prompts), rng.randint(1, 8), rng.random() < 0.3) for _ in range(200)]

    def client(share):
        with httpx.Client(timeout=60) as http:
            got = []
            for prompt, max_tokens, stream in share:
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
                r = http.post(f"{s.url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                if stream:
                    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
                    got.append("".join(e["choices"][0]["text"] for e in events))
                else:
                    got.append(r.json()["choices"][0]["text"])
            return got

    shares = [cases[i::16] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, shares))
    assert sum(map(len, results)) == 200
    for share, got in zip(shares, results):
        assert got == [oracle(p, m)["text"] for p, m, _ in share]
    assert s.idle()


BAD = [  # (body, status, words the message must contain, param)
    (b'{"prompt": "a",', 400, "not valid JSON", None),
    (b"[1, 2]", 400, "must be a JSON object", None),
    ({}, 400, "'prompt' is required", "prompt"),
    ({"prompt": 5}, 400, "'prompt' must be a string", "prompt"),
    ({"prompt": ""}, 400, "prompt is empty", "prompt"),
    ({"prompt": []}, 400, "empty list", "prompt"),
    ({"prompt": [1, "a"]}, 400, "'prompt' must be", "prompt"),
    ({"prompt": [10 ** 6]}, 400, "outside the vocabulary", "prompt"),
    ({"prompt": "a", "max_tokens": "10"}, 400, "'max_tokens' input should be a valid integer", "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, 400, "'max_tokens'", "max_tokens"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens must be an integer in [0, 511], got -1", "max_tokens"),
    ({"prompt": "a", "max_tokens": 10 ** 12}, 400, "max_tokens must be an integer in [0, 511]", "max_tokens"),
    ({"prompt": "x" * 500, "max_tokens": 20}, 400, "exceeds the server's limit of 512 tokens", "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 400, "model 'gpt-4' is not served here", "model"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature must be a finite number >= 0", "temperature"),
    ({"prompt": "a", "temperature": "hot"}, 400, "'temperature'", "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p must be a number in (0, 1]", "top_p"),
    ({"prompt": "a", "top_k": -5}, 400, "top_k must be an integer in [-1, 2**31)", "top_k"),
    ({"prompt": "a", "top_k": 10 ** 25}, 400, "top_k must be an integer in [-1, 2**31)", "top_k"),
    ({"prompt": "a", "seed": 2 ** 70}, 400, "seed must be an integer in [0, 2**63)", "seed"),
    ({"prompt": "a", "seed": 2 ** 63 - 1, "n": 2}, 400, "seed must be an integer in [0, 2**63 - n] with n=2 (choice j "
                                                        "uses seed + j), got 9223372036854775807", "seed"),
    (b'{"prompt": "\\ud800abc"}', 400, "the prompt is not valid Unicode text", "prompt"),
    (b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nested too deeply", None),
    (b'{"prompt": [' + b"9" * 5000 + b'], "max_tokens": 1}', 400, "holds a number that cannot be read", None),
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "'presence_penalty' is not implemented: only its no-op value 0 "
     "is accepted, got 0.5", "presence_penalty"),
    ({"prompt": "a", "echo": True}, 400, "only its no-op value false is accepted, got true", "echo"),
    ({"prompt": "a", "logit_bias": {"5": 1}}, 400, 'only its no-op value {} is accepted, got {"5": 1}', "logit_bias"),
    ({"prompt": "a", "min_p": 2}, 400, "min_p must be a number in [0, 1]", "min_p"),
    ({"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty must be", "repetition_penalty"),
    ({"prompt": "a", "seed": -1}, 400, "seed must be", "seed"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' must be a string or a list of at most 4", "stop"),
    ({"prompt": "a", "stop": 3}, 400, "'stop' must be", "stop"),
    ({"prompt": "a", "stop": ["x", ""]}, 400, "'stop' must not contain an empty string", "stop"),
    ({"prompt": "a", "stop": ""}, 400, "'stop' must not contain an empty string", "stop"),
    ({"prompt": "a", "n": 0}, 400, "n must be an integer >= 1", "n"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options is only allowed with stream",
     "stream_options"),
    ({"prompt": "a", "stream": "yes"}, 400, "'stream'", "stream"),
    ({"prompt": "a", "logprobs": 3}, 400, "'logprobs' is not implemented: only its no-op value null is accepted, "
                                         "got 3", "logprobs"),
    ({"prompt": "a", "foo": 1}, 400, "unsupported field 'foo'", "foo"),
]


def test_every_bad_request_is_a_400_naming_the_problem(servers, oracle):
    s = servers["main"]
    failures = []
    for body, status, words, param in BAD:
        r = s.post(body)
        try:
            err = r.json().get("error", {})
        except ValueError:
            err = {}
        if (r.status_code, err.get("type"), err.get("param")) != (status, "invalid_request_error", param) \
                or words not in err.get("message", ""):
            failures.append(f"{body!r:.60}: {r.status_code} {r.text[:300]}")
    assert not failures, "\n".join(failures)
    with pytest.raises(openai.BadRequestError, match="temperature must be"):
        s.client().completions.create(model="tiny", prompt="a", temperature=-2)
    a = s.client().completions.create(model="tiny", prompt="def ", max_tokens=5, temperature=0, logprobs=None)
    assert a.choices[0].text == oracle("def ", 5)["text"]            # a null field counts as not given
    no_ops = {"echo": False, "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "logit_bias": {}}
    r = s.post({"prompt": "def ", "max_tokens": 5, "temperature": 0, **no_ops})  # sent by some clients: accepted
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == oracle("def ", 5)["text"]
    assert s.idle()


def first_chunk(lines) -> dict:
    """The first event of an SSE stream's line iterator (keep the iterator: closing it closes the connection)."""
    for line in lines:
        if line.startswith("data: {"):
            return json.loads(line[6:])
    raise AssertionError("no chunk")


def test_a_client_that_disconnects_frees_its_slot(servers, oracle):
    """One slot: a stream (then a plain request) that would take minutes is dropped by its client; the slot is
    free at once and the next request is answered."""
    s = servers["small"]
    long = {"prompt": "def ", "max_tokens": 10 ** 6, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert first_chunk(lines)["choices"][0]["finish_reason"] is None
        assert httpx.get(f"{s.url}/health").json()["running"] == 1
    assert s.idle()
    with pytest.raises(httpx.ReadTimeout):
        s.post(long, timeout=0.5)
    assert s.idle()
    port = int(s.url.rsplit(":", 1)[1])
    for stream in (True, False):                   # gone before the server even answers
        body = json.dumps({**long, "stream": stream}).encode()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        a = s.client().completions.create(model="tiny", prompt="def ", max_tokens=5, temperature=0, timeout=30)
        assert a.choices[0].text == oracle("def ", 5)["text"]


def test_a_full_queue_answers_503_and_recovers(servers):
    s = servers["small"]
    long = {"prompt": "def ", "max_tokens": 10 ** 6, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{s.url}/v1/completions", json=long, timeout=60) as r1, \
            httpx.stream("POST", f"{s.url}/v1/completions", json=long, timeout=60) as r2:
        lines = r1.iter_lines()
        first_chunk(lines)                                    # r1 holds the slot, r2 waits: the queue (2) is full
        full = s.post({"prompt": "a", "max_tokens": 1})
        assert full.status_code == 503 and "--max-queue 2" in full.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError, match="busy"):
            s.client().completions.create(model="tiny", prompt="a", max_tokens=1)
        assert r2.status_code == 200
    assert s.idle()
    r = s.post({"prompt": "a", "max_tokens": 1, "n": 3})                    # 3 choices never fit a queue of 2
    assert r.status_code == 400 and "can never fit the server's queue of 2" in r.json()["error"]["message"]
    r = s.post({"prompt": ["a", "b", "c"], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert s.post({"prompt": "a", "max_tokens": 1, "n": 2}).status_code == 200


def test_a_request_past_its_timeout_is_aborted_with_504(servers):
    s = servers["strict"]
    long = {"prompt": "def ", "max_tokens": 10 ** 6, "ignore_eos": True}
    start = time.monotonic()
    r = s.post(long)
    assert r.status_code == 504 and "--request-timeout" in r.json()["error"]["message"]
    assert time.monotonic() - start < 10
    assert s.idle()
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert "--request-timeout" in json.loads(events[-2][6:])["error"]["message"] and events[-1] == "data: [DONE]"
    assert s.idle()
    assert s.post({"prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_body_over_the_size_limit_is_answered_413_without_being_read(servers, oracle):
    """And a body, or a request line and headers, that never complete are answered 408 at the request timeout (a
    kept-alive idle connection is not: uvicorn's keep-alive closes it); each closes the connection."""
    s = servers["strict"]
    limit = 2 ** 14
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:   # headers only: the body never comes
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {10 ** 9}\r\n\r\n".encode())
        answer = b""
        while part := conn.recv(65536):      # the server closes the connection: the body it refused never comes
            answer += part
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-body-mb" in answer, answer[:500]
    assert b"connection: close" in answer.lower(), answer[:500]

    def chunks():                        # a chunked body (no Content-Length) that grows past the limit
        yield b'{"prompt": "def ", '
        for _ in range(64):
            yield b" " * 1024
        yield b'"max_tokens": 2}'

    r = httpx.post(f"{s.url}/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error", r.text
    with socket.create_connection((host, int(port)), timeout=30) as conn:   # a body that stalls: 408 at the timeout
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\n"
                     '{"prompt": "def"'.encode())
        answer = b""
        while part := conn.recv(65536):
            answer += part
    assert answer.startswith(b"HTTP/1.1 408") and b"--request-timeout" in answer, answer[:500]
    for head in (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Le", ""):   # a stalled head, or nothing
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(head.encode())
            answer = b""
            while part := conn.recv(65536):
                answer += part
        assert answer.startswith(b"HTTP/1.1 408") and b"request line and headers" in answer, (head, answer[:500])
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"
    with socket.create_connection((host, int(port)), timeout=30) as conn:   # a head after a kept-alive request
        request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        conn.sendall(request)
        first = b""
        while not first.endswith(b"}"):     # the whole /health answer (head and body may come apart)
            first += conn.recv(65536)
        time.sleep(1.5)                  # past the deadline while idle: kept alive (uvicorn's 5 s), no 408
        conn.sendall(request[:10])
        answer = b""
        while part := conn.recv(65536):
            answer += part
    assert first.startswith(b"HTTP/1.1 200") and answer.startswith(b"HTTP/1.1 408"), (first[:200], answer[:500])
    fits = json.dumps({"prompt": "def ", "max_tokens": 3, "temperature": 0}).encode()
    r = s.post(fits[:-1] + b" " * (limit - len(fits)) + b"}")         # exactly at the limit: served
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == oracle("def ", 3)["text"]
    assert s.post(fits[:-1] + b" " * (limit - len(fits) + 1) + b"}").status_code == 413
    assert s.idle()


def stalled_body(url: str) -> socket.socket:
    """A connection whose request body stops after 5 of its 40 bytes."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: 40\r\n\r\n".encode()
                 + b'{"pro')
    return conn


def answer_503_and_close(conn: socket.socket) -> None:
    """The server answers a stalled body 503 (JSON, connection closed) once it stops."""
    answer = b""
    while part := conn.recv(65536):
        answer += part
    conn.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower(), answer[:500]
    assert "shutting down" in json.loads(body)["error"]["message"], answer[:500]


@pytest.mark.parametrize("name, sig", [("strict", signal.SIGINT), ("small", signal.SIGTERM)])
def test_a_signal_stops_the_server_cleanly(servers, name, sig):
    """Idle ("strict", SIGINT) or with a stream running and a request whose body stalls ("small", SIGTERM, 1 s for
    them to finish): the process stops accepting, ends the stream, answers the stalled request 503, and exits 0
    within a few seconds."""
    s = servers[name]
    started, rest = threading.Event(), []
    if name == "small":
        def stream():
            body = {"prompt": "a", "max_tokens": 10 ** 6, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                first_chunk(lines)
                started.set()
                rest.append("\n".join(lines))

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(30)
        stalled = stalled_body(s.url)
        time.sleep(0.5)
    start = time.monotonic()
    s.proc.send_signal(sig)
    assert s.proc.wait(timeout=15) == 0, s.log.read_text()[-2000:]
    assert time.monotonic() - start < 8
    assert "Traceback" not in s.log.read_text()
    if name == "small":                              # the stream was ended with an error event
        reader.join(10)
        assert "the server is shutting down" in rest[0] and rest[0].endswith("data: [DONE]\n")
        answer_503_and_close(stalled)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health")


def test_a_stop_while_the_server_starts_is_never_lost(checkpoint, monkeypatch, capsys):
    """SIGTERM in the moment between the command handing over to uvicorn and uvicorn taking the signals: the server
    starts, stops at once and the command returns 0; a stop while loading that library code caught and dropped
    still ends the command (143) before it serves. (Before: the first was swallowed and the server ran on.)"""
    import os

    import uvicorn

    from mamba2.errors import recording_interrupt
    from mamba2.serving.engine import Engine as EngineClass

    watchdog = threading.Timer(20, lambda: os.kill(os.getpid(), signal.SIGINT))    # stops a server that ran on
    watchdog.start()
    real_run = uvicorn.Server.run

    def run_after_a_signal(self, *args, **kw):
        signal.raise_signal(signal.SIGTERM)
        return real_run(self, *args, **kw)

    monkeypatch.setattr(uvicorn.Server, "run", run_after_a_signal)
    start = time.monotonic()
    try:
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", "0"]) == 0
    finally:
        watchdog.cancel()
    assert time.monotonic() - start < 15
    assert capsys.readouterr().out.rstrip().endswith("stopped")

    def warm_up_interrupted(self):
        try:
            recording_interrupt(signal.SIGTERM, None)
        except BaseException:       # as some library code does with whatever it catches
            pass

    monkeypatch.setattr(EngineClass, "warm_up", warm_up_interrupted)
    assert main(["serve", "--checkpoint", str(checkpoint), "--port", "0"]) == 143
    assert "serving" not in capsys.readouterr().out


def test_a_second_signal_ends_running_requests_with_503_at_once(checkpoint, tmp_path):
    """SIGINT waits up to --shutdown-timeout for running requests; a second SIGINT ends them now, and a
    non-streaming client, and one still sending its body, get a JSON 503 (not a cut connection or a bare 500);
    the process exits 0."""
    s = Server(checkpoint, "--max-batch", 1, "--max-len", 10 ** 7, "--shutdown-timeout", 120,
               log=tmp_path / "serve.log").wait_ready()
    try:
        answer = []
        body = {"prompt": "a", "max_tokens": 10 ** 6, "ignore_eos": True}
        client = threading.Thread(target=lambda: answer.append(s.post(body, timeout=60)), daemon=True)
        client.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{s.url}/health").json()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stalled = stalled_body(s.url)                      # a request that is still reading its body
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert s.proc.poll() is None                       # the first signal waits for the requests
        start = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=15) == 0, s.log.read_text()[-2000:]
        assert time.monotonic() - start < 8
        answer_503_and_close(stalled)
        client.join(10)
        r = answer[0]
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert "Traceback" not in s.log.read_text()
    finally:
        s.close()


def test_serve_user_errors_are_one_line(checkpoint, capsys):
    assert main(["serve", "--checkpoint", "no/such/dir"]) == 2
    assert "checkpoint not found: no/such/dir" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--request-timeout", "0"]) == 2
    assert "--request-timeout must be a finite number of seconds > 0" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--max-body-mb", "nan"]) == 2
    assert "--max-body-mb must be a finite number of MiB > 0, got nan" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "\n" not in err
    assert main(["serve", "--checkpoint", str(checkpoint), "--prefix-file", "no/such/file"]) == 2
    assert "cannot read --prefix-file no/such/file" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--prefix", ""]) == 2
    assert "empty --prefix" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--prefix", "x" * 40, "--max-len", "40"]) == 2
    assert "leaves no room under --max-len 40" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0 and "--max-queue" in capsys.readouterr().out


def test_stream_events_survive_unicode_line_separators():
    """Generated text can hold U+2028, U+2029, U+0085 (a byte tokenizer emits any byte): each event must stay one
    line for clients that split on every Unicode line end (httpx's aiter_lines), and decode to the same text."""
    from mamba2.serving.server import _sse

    text = "a\u2028b\u2029c\x85d\x0be\x1cf\r\ng"
    event = _sse({"choices": [{"text": text}]})
    lines = [ln for ln in event.splitlines() if ln]
    assert len(lines) == 1 and json.loads(lines[0][len("data: "):])["choices"][0]["text"] == text

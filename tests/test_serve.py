"""`taoke serve` end to end: real uvicorn servers on 127.0.0.1 (free ports) started through the CLI, driven by
the official `openai` client and raw HTTP; a proxy in front of a second real server; a sealed run served.

Every load here is a fixed number of requests with timeouts; servers stop themselves (SIGTERM) at the end."""

import hashlib
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import taoke
from taoke.inference.language import load_chat_model
from taoke.formats.sealed import resolve_key
from tests.conftest import ROOT
from tests.serve_helpers import KEYS, SLOW_KEY, Server, http, metric, tiny_sft_run, write_keys

PROMPTS = ["hello there", "What is your name?", "Tell me a story about a cat and a dog who became friends.",
           "2+2?", "Do you like music?", "Explain gravity."]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return tiny_sft_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("keys") / "keys.txt")


@pytest.fixture(scope="module")
def server(lm_run, keys, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.log"
    s = Server(lm_run, "--api-keys", keys, "--max-batch", "4", "--max-tokens", "64", "--max-body-bytes", "65536",
               "--audit-log", audit, "--drain", "300")
    s.audit = audit
    yield s
    s.stop()


def client(url, key=KEYS["alice"]):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)


def reference(lm_run, prompts, max_new_tokens):
    """Greedy completions of each prompt alone with transformers' own model.generate."""
    pred = taoke.load(lm_run)
    tok, model = pred.tokenizer, pred.model
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        x = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, x.shape[1]:], skip_special_tokens=True))
    return out


def chat(c, prompt, max_tokens=24, **kw):
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model="tiny-sft", messages=[{"role": "user", "content": prompt}],
                                     max_tokens=max_tokens, **kw)


def test_openai_client_chat_completions_and_streams(server):
    c = client(server.url)
    assert [m.id for m in c.models.list().data] == ["tiny-sft"]
    whole = chat(c, PROMPTS[2])
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens == \
        whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(chat(c, PROMPTS[2], stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    comp = c.completions.create(model="tiny-sft", prompt="Once upon a time", temperature=0, max_tokens=10)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny-sft", prompt="Once upon a time", temperature=0, max_tokens=10, stream=True))
    assert comp.object == "text_completion" and comp.choices[0].text == streamed
    assert comp.usage.completion_tokens <= 10
    sampled = [chat(c, PROMPTS[0], temperature=0.8, seed=3).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]              # a seed makes sampling reproducible


def test_concurrent_greedy_outputs_equal_model_generate_alone(server, lm_run):
    """Six clients at once (batch of 4: requests join and leave mid-way), each output exactly what
    model.generate gives for that prompt alone."""
    c = client(server.url)
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda p: chat(c, p, max_tokens=20).choices[0].message.content, PROMPTS))
    assert got == reference(lm_run, PROMPTS, 20)
    assert metric(server.url, "taoke_batch_size_sum", KEYS["bob"]) > metric(server.url, "taoke_batch_size_count",
                                                                            KEYS["bob"])   # steps were shared


def test_logprobs_are_the_models_own_log_softmax(server, lm_run):
    """Chat (logprobs + top_logprobs) and legacy completions (an integer logprobs), read with the openai client,
    against the model's own forward pass over the prompt and transformers' greedy answer; streamed chunks carry the
    same tokens between them."""
    pred = taoke.load(lm_run)
    tok, model = pred.tokenizer, pred.model
    c = client(server.url)

    def expected(prompt_ids, n, k):
        x = torch.tensor([prompt_ids])
        answer = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(prompt_ids):]
        with torch.no_grad():
            logits = model(torch.cat([x[0], answer])[None]).logits[0, len(prompt_ids) - 1:-1]
        lp = torch.log_softmax(logits.float(), -1)
        return [(tok.decode([int(t)]), float(lp[j, t]),
                 [(tok.decode([int(i)]), float(v)) for v, i in zip(*lp[j].topk(k))])
                for j, t in enumerate(answer) if int(t) != tok.eos_token_id]

    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False,
                                   add_generation_prompt=True)
    want = expected(tok(text, add_special_tokens=False)["input_ids"], 8, 3)
    got = chat(c, PROMPTS[1], max_tokens=8, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert len(got) == len(want) > 0
    for g, (token, lp, top) in zip(got, want):
        assert g.token == token and g.logprob == pytest.approx(lp, abs=2e-4)
        assert [t.token for t in g.top_logprobs] == [t for t, _ in top]
        assert [t.logprob for t in g.top_logprobs] == pytest.approx([v for _, v in top], abs=2e-4)
    assert chat(c, PROMPTS[1], max_tokens=4).choices[0].logprobs is None           # only when asked
    chunks = [ch.choices[0] for ch in chat(c, PROMPTS[1], max_tokens=8, logprobs=True, top_logprobs=3, stream=True)
              if ch.choices]
    streamed = [t for ch in chunks if ch.logprobs for t in ch.logprobs.content]  # each chunk: the tokens of its text
    assert [t.token for t in streamed] == [t.token for t in got]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in got], abs=2e-4)
    assert all(ch.logprobs is None for ch in chunks if not (ch.delta.content or ch.finish_reason))

    want = expected(tok("Once upon a time")["input_ids"], 6, 2)
    got = c.completions.create(model="tiny-sft", prompt="Once upon a time", temperature=0, max_tokens=6,
                               logprobs=2).choices[0]
    assert got.logprobs.tokens == [t for t, _, _ in want] and "".join(got.logprobs.tokens) == got.text
    assert got.logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in want], abs=2e-4)
    assert [list(d) for d in got.logprobs.top_logprobs] == [[t for t, _ in top] for _, _, top in want]
    assert got.logprobs.text_offset[0] == 0
    pieces = [ch.choices[0].logprobs for ch in c.completions.create(
        model="tiny-sft", prompt="Once upon a time", temperature=0, max_tokens=6, logprobs=2, stream=True)
        if ch.choices and ch.choices[0].logprobs]
    assert [t for lp in pieces for t in lp.tokens] == got.logprobs.tokens
    assert [o for lp in pieces for o in lp.text_offset] == got.logprobs.text_offset


BATTERY = [
    ("invalid JSON", b'{"model": "tiny-sft", "messages": [', 400),
    ("array body", [1, 2], 400),
    ("messages not a list", {"model": "tiny-sft", "messages": "hi"}, 400),
    ("max_tokens a string", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
     400),
    ("temperature a word", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}],
                            "temperature": "hot"}, 400),
    ("stream a string", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400),
    ("unknown role", {"model": "tiny-sft", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("no messages", {"model": "tiny-sft", "messages": []}, 400),
    ("negative max_tokens", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
     400),
    ("huge max_tokens", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}],
                         "max_tokens": 10 ** 9}, 400),
    ("n=2", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400),
    ("top_logprobs without logprobs", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}],
                                       "top_logprobs": 3}, 400),
    ("top_logprobs 21", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                         "top_logprobs": 21}, 400),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("path as model", {"model": "../../../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("absolute path as model", {"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("huge body", {"model": "tiny-sft", "messages": [{"role": "user", "content": "x" * 200_000}]}, 413),
]


def test_malformed_request_battery_then_the_server_still_answers(server):
    url = server.url + "/v1/chat/completions"
    key = KEYS["alice"]
    for name, body, want in BATTERY:
        status, data, _ = http("POST", url, body, key=key)
        assert status == want, (name, status, data)
        assert isinstance(data, dict) and data["error"]["message"] and data["error"]["type"], name
        assert "root:" not in json.dumps(data), name        # nothing was read from a path
    for headers, want in [({}, 401), ({"Authorization": "Bearer sk-wrong-" + "x" * 30}, 401),
                          ({"Authorization": "Basic " + KEYS["alice"]}, 401)]:
        status, data, _ = http("POST", url, {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}]},
                               headers=headers)
        assert status == want and data["error"]["code"] == "invalid_api_key"
    assert http("GET", server.url + "/v1/nothing", key=key)[0] == 404
    assert http("GET", server.url + "/v1/nothing")[0] == 401                # no route probing without a key
    assert http("GET", url, key=key)[0] == 405
    status, data, _ = http("POST", server.url + "/v1/completions", {"model": "tiny-sft", "prompt": ["a", "b"]},
                           key=key)
    assert status == 400 and data["error"]["param"]
    assert http("GET", server.url + "/v1/models", key=SLOW_KEY)[0] == 200          # per-key rate limit
    status, data, headers = http("GET", server.url + "/v1/models", key=SLOW_KEY)
    assert status == 429 and int(headers["Retry-After"]) >= 1 and data["error"]["code"] == "rate_limit_exceeded"
    status, _, headers = http("GET", server.url + "/v1/models", key=key, headers={"Origin": "https://evil.example"})
    assert status == 200 and headers.get("access-control-allow-origin") is None      # CORS is off
    assert chat(client(server.url), "still there?", max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_health_metrics_and_audit_lines(server):
    assert http("GET", server.url + "/healthz")[0] == 200
    assert http("GET", server.url + "/readyz")[0] == 200
    assert http("GET", server.url + "/metrics")[0] == 401                   # keys guard the metrics too
    status, text, headers = http("GET", server.url + "/metrics", key=KEYS["bob"])
    assert status == 200 and "text/plain" in headers["content-type"]
    for name in ("taoke_requests_total", "taoke_request_duration_seconds_bucket",
                 "taoke_time_to_first_token_seconds_bucket", "taoke_generated_tokens_total",
                 "taoke_generated_tokens_per_second", "taoke_queue_depth", "taoke_batch_size_bucket"):
        assert name in text, name
    assert 'taoke_requests_total{route="/v1/chat/completions",status="200"}' in text
    lines = [json.loads(line) for line in server.audit.read_text().splitlines()]
    chats = [a for a in lines if a["route"] == "/v1/chat/completions" and a["status"] == 200]
    assert chats and all(a["key_id"] == "alice" and a["prompt_tokens"] > 0 and "completion_tokens" in a
                         for a in chats)
    assert any(a["status"] == 401 and a["key_id"] is None for a in lines)
    raw = server.audit.read_text()
    assert KEYS["alice"] not in raw and KEYS["bob"] not in raw and "cat and a dog" not in raw


@pytest.mark.slow
def test_upstream_proxy_puts_keys_and_metrics_in_front_of_another_server(server, lm_run, tmp_path):
    """taoke in front of a running OpenAI-compatible server (here a second taoke server, as vLLM would be)."""
    front_keys = tmp_path / "front.txt"
    front_keys.write_text("carol sk-carol-" + "c3" * 20 + "\n")
    proxy = Server(lm_run, "--upstream", server.url, "--api-keys", front_keys, "--model-name", "tiny-sft",
                   "--max-tokens", "32", "--audit-log", tmp_path / "audit.log",
                   env={"TAOKE_UPSTREAM_API_KEY": KEYS["bob"]})
    try:
        c = client(proxy.url, "sk-carol-" + "c3" * 20)
        direct = chat(client(server.url), PROMPTS[1], max_tokens=16)
        via = chat(c, PROMPTS[1], max_tokens=16)
        assert via.choices[0].message.content == direct.choices[0].message.content
        assert via.usage.completion_tokens == direct.usage.completion_tokens
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chat(c, PROMPTS[1], max_tokens=16,
                                                                           stream=True) if ch.choices)
        assert streamed == direct.choices[0].message.content
        assert http("POST", proxy.url + "/v1/chat/completions", {"model": "tiny-sft", "messages": []},
                    key="sk-carol-" + "c3" * 20)[0] == 400
        assert http("GET", proxy.url + "/v1/models", key=KEYS["alice"])[0] == 401   # the front's own keys
        assert metric(proxy.url, "taoke_generated_tokens_total", "sk-carol-" + "c3" * 20) >= \
            2 * direct.usage.completion_tokens - 2
        audit = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        assert any(a["key_id"] == "carol" and a.get("completion_tokens") for a in audit)
    finally:
        assert proxy.stop() == 0


def test_sigterm_finishes_in_flight_requests_then_exits_0(server):
    c = client(server.url)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=chat(c, PROMPTS[2], max_tokens=16)))
    worker.start()
    time.sleep(0.5)
    code = server.stop()
    worker.join(timeout=300)
    assert code == 0
    assert result["r"].choices[0].finish_reason in ("stop", "length") and result["r"].usage.completion_tokens > 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2)


# ------------------------------------------------------------------------------------------------ sealed


def weight_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))


@pytest.mark.slow
def test_sealed_run_serves_refuses_tampering_and_unseals(lm_run, tmp_path, taoke_main):
    run = tmp_path / "sealed-run"
    shutil.copytree(lm_run, run)
    lineage_before = hashlib.sha256((run / "lineage.json").read_bytes()).hexdigest()
    plain = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weight_files(run / "model")}
    key = tmp_path / "seal.key"
    assert taoke_main("seal", run, "--key-file", key, "--new-key")[0] == 0
    assert weight_files(run) == [] and (run / "model" / "model.safetensors.sealed").is_file()
    assert json.loads((run / "lineage.json").read_text())["sealed"]["cipher"] == "AES-256-GCM"
    assert key.read_text().strip() not in (run / "lineage.json").read_text() + (run / "recipe.yaml").read_text()
    taoke.Run(run).check_model_files()                        # the sealed files verify against the record

    code, _, err = taoke_main("predict", run, "hello")
    assert code == 2 and "sealed" in err and "--key-file" in err
    wrong = tmp_path / "wrong.key"
    wrong.write_text("11" * 32)
    code, _, err = taoke_main("predict", run, "hello", "--key-file", wrong)
    assert code == 2 and "key is wrong" in err
    code, sealed_out, _ = taoke_main("predict", run, "hello", "--key-file", key)
    plain_out = taoke_main("predict", lm_run, "hello")[1]
    assert code == 0 and sealed_out == plain_out and "completion" in plain_out
    data = tmp_path / "held.jsonl"
    data.write_text("".join(line + "\n" for line in
                            (ROOT / "data" / "chatterbot" / "dialogs.jsonl").read_text().splitlines()[:20]))
    chat_model, _ = load_chat_model(str(run), key=resolve_key(key))                # what `taoke chat` loads
    assert torch.equal(chat_model.lm_head.weight, taoke.load(lm_run).model.lm_head.weight)
    sealed_eval = taoke_main("eval", run, "--data", data, "--json", "--key-file", key)
    assert sealed_eval[0] == 0
    assert json.loads(sealed_eval[1])["metrics"] == json.loads(taoke_main("eval", lm_run, "--data", data,
                                                                          "--json")[1])["metrics"]

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    s = Server(run, "--key-file", key, "--model-name", "tiny-sft", "--max-batch", "1", "--max-queue", "1",
               "--max-tokens", "1000",
               env={"TMPDIR": str(scratch)})
    try:
        assert weight_files(run) == [] and weight_files(scratch) == []   # decrypted in memory only
        c = client(s.url, key="unused")
        assert chat(c, PROMPTS[1], max_tokens=12).choices[0].message.content == reference(lm_run, PROMPTS[1:2], 12)[0]
        check_disconnect_frees_the_slot(s, c)
        check_full_queue_says_when_to_retry(s, c)
        assert weight_files(run) == [] and weight_files(scratch) == []
    finally:
        assert s.stop() == 0

    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    f = tampered / "model" / "model.safetensors.sealed"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    code, _, err = taoke_main("predict", tampered, "hello", "--key-file", key)
    assert code == 2 and "sha256 differs" in err
    (tampered / "lineage.json").write_text((run / "lineage.json").read_text().replace(       # records forged too:
        json.loads((run / "lineage.json").read_text())["sealed"]["files"]["model.safetensors"]["sha256"],
        hashlib.sha256(bytes(data)).hexdigest()))
    code, _, err = taoke_main("predict", tampered, "hello", "--key-file", key)
    assert code == 2 and "key is wrong or the file was changed" in err                  # GCM still refuses

    assert taoke_main("unseal", run, "--key-file", key)[0] == 0
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weight_files(run / "model")} == plain
    assert hashlib.sha256((run / "lineage.json").read_bytes()).hexdigest() == lineage_before
    assert taoke_main("predict", run, "hello")[1] == plain_out


def check_disconnect_frees_the_slot(s, c):
    """One batch row (--max-batch 1): a client that leaves mid-stream must not keep it."""
    before = metric(s.url, "taoke_generated_tokens_total")
    stream = chat(c, PROMPTS[2], max_tokens=900, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)                                  # the role, then generated text: it is running
    stream.response.close()                                     # the client goes away
    started = time.monotonic()
    follow = chat(c, PROMPTS[0], max_tokens=8)
    assert follow.choices[0].finish_reason in ("stop", "length")
    end = time.monotonic() + 30
    while metric(s.url, "taoke_running_requests") != 0 and time.monotonic() < end:
        time.sleep(0.5)
    assert metric(s.url, "taoke_running_requests") == 0
    generated = metric(s.url, "taoke_generated_tokens_total") - before
    assert generated < 300, f"the abandoned request kept generating ({generated} tokens)"
    assert time.monotonic() - started < 120


def check_full_queue_says_when_to_retry(s, c):
    """--max-batch 1 --max-queue 1: one running, one waiting, the third is turned away with Retry-After."""
    running = chat(c, PROMPTS[2], max_tokens=900, stream=True)
    chunks = iter(running)
    next(chunks), next(chunks)                                  # generating: the one row is taken
    waiting = chat(c, PROMPTS[2], max_tokens=900, stream=True)
    status, data, headers = http("POST", s.url + "/v1/chat/completions",
                                 {"model": "tiny-sft", "messages": [{"role": "user", "content": "x"}]})
    assert status == 429 and int(headers["Retry-After"]) >= 1 and data["error"]["type"] == "rate_limit_error"
    for st in (running, waiting):
        st.response.close()

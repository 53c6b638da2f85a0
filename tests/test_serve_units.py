"""Unit tests of the serving parts and sealing: detokenizer, keys, engine vs model.generate, sealed files."""

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from taoke.errors import DataError, ModelError
from taoke.formats.sealed import decrypt_file, encrypt_file, new_key, parse_key
from taoke.ship.serve import is_loopback
from taoke.ship.serve.auth import KeyRing, TokenBucket, bearer, read_keys
from taoke.ship.serve.engine import Engine, QueueFull, Sampling
from taoke.ship.serve.metrics import ServeMetrics
from taoke.ship.serve.text import TextStream
from tests.lm_helpers import smollm_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


# ------------------------------------------------------------------------------------------------ text

def stream_all(tok, text, stop=None):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tok, stop)
    pieces = [s.add(i) for i in ids]
    pieces.append(s.finish())
    return pieces, s


def test_text_stream_pieces_join_to_the_full_decode(tok):
    text = "Héllo wörld — 你好，世界! 🙂 done."
    pieces, _ = stream_all(tok, text)
    assert "".join(pieces) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    assert all("\ufffd" not in p for p in pieces)          # no half characters are ever sent


def test_text_stream_cuts_at_stop_strings_and_holds_back_their_prefixes(tok):
    pieces, s = stream_all(tok, "one two three. four five", stop=["three."])
    assert "".join(pieces) == "one two "
    assert s.stopped
    assert all("thr" not in p for p in pieces)
    pieces, s = stream_all(tok, "one two thr", stop=["three"])   # a prefix that never completes is sent at the end
    assert "".join(pieces) == "one two thr" and not s.stopped


# ------------------------------------------------------------------------------------------------ keys

def test_keys_file_hashed_entries_ids_and_rates(tmp_path):
    secret = "sk-" + "a" * 40
    other = "sk-" + "b" * 40
    f = tmp_path / "keys.txt"
    f.write_text(f"# comment\nalice {secret} 120\nbob sha256:{hashlib.sha256(other.encode()).hexdigest()}\n"
                 f"sk-{'c' * 30}\n")
    keys = read_keys(f)
    assert [k.id for k in keys][:2] == ["alice", "bob"] and keys[0].per_minute == 120
    assert len(keys[2].id) == 8
    ring = KeyRing(keys)
    assert ring.identify(secret).id == "alice" and ring.identify(other).id == "bob"
    assert ring.identify("sk-" + "a" * 39) is None and ring.identify(None) is None
    assert secret not in repr(ring.keys)                       # only digests are held
    assert bearer("Bearer  xyz ") == "xyz" and bearer("Basic xyz") is None and bearer(None) is None


@pytest.mark.parametrize("line,match", [("short", "at least 16"), ("a b c d", "expected"),
                                        ("x sha256:abc", "64 hex"), ("x sk-aaaaaaaaaaaaaaaaaaaa -3", "positive")])
def test_keys_file_errors_name_the_line(tmp_path, line, match):
    f = tmp_path / "keys.txt"
    f.write_text("\n" + line + "\n")
    with pytest.raises(DataError, match=f"keys.txt:2: .*{match}"):
        read_keys(f)


def test_token_bucket_allows_a_burst_then_says_how_long_to_wait():
    b = TokenBucket(per_minute=3)
    assert [b.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert 0 < b.take() <= 20.0


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


# ------------------------------------------------------------------------------------------------ engine

def run_engine(engine, prompts, sampling):
    async def go():
        loop = asyncio.get_running_loop()
        gens = [engine.submit(p, sampling, 3600, loop) for p in prompts]
        if not engine.thread.is_alive():   # started after every request is queued: admission order is fixed
            engine.start()

        async def drain(g):
            while (event := await g.events.get())[0] == "text":
                pass
            assert event[0] == "done", event
        await asyncio.gather(*[drain(g) for g in gens])
        return [g.tokens for g in gens]
    return asyncio.run(go())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_engine_greedy_tokens_equal_model_generate_one_request_at_a_time(tok, attention):
    """Prompts of different lengths and max_tokens share steps, join and leave mid-way (max_batch 3 < 7
    requests); each request's tokens must be exactly what model.generate gives for it alone, on either attention
    (eager adds the mask the engine hands it to its scores, SDPA reads it as booleans)."""
    model = tiny_llama()
    model.set_attn_implementation(attention)
    prompts = [tok(f"{'word ' * (3 * i + 1)}question {i}")["input_ids"] for i in range(7)]
    engine = Engine(model, tok, max_batch=3, max_queue=16).start()
    try:
        got = run_engine(engine, prompts, Sampling(max_tokens=12, temperature=0))
    finally:
        engine.stop()
    reference = tiny_llama()      # a second copy, as transformers runs it alone
    reference.set_attn_implementation(attention)
    for p, tokens in zip(prompts, got):
        assert tokens == generate_alone(reference, tok, p, 12)


def test_engine_refuses_an_attention_that_takes_no_ready_mask(tok):
    model = tiny_llama()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ModelError, match="flex_attention attention does not take.*SDPA or eager"):
        Engine(model, tok)


def generate_alone(model, tok, prompt, n):
    x = torch.tensor([prompt])
    ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    return ref[:ref.index(2)] if 2 in ref else ref        # the engine does not return the eos token


def test_engine_reuses_a_shared_prompt_prefix_and_still_generates_what_the_model_does_alone(tok):
    """Prompts that resend one long history prefill it once: later ones start from its stored keys/values
    (counted in /metrics), and every request's tokens equal model.generate's on its whole prompt."""
    model = tiny_llama()
    history = tok(" ".join(f"turn {i}: the quick brown fox" for i in range(30)))["input_ids"]
    prompts = [history + tok(f" question {q}?")["input_ids"] for q in range(5)] + [history[:40] + [7, 8, 9]]
    metrics = ServeMetrics()
    engine = Engine(model, tok, max_batch=4, max_queue=16, metrics=metrics).start()
    try:
        got = run_engine(engine, prompts, Sampling(max_tokens=10, temperature=0))
        again = run_engine(engine, prompts[:1], Sampling(max_tokens=10, temperature=0))   # the very same prompt
    finally:
        engine.stop()
    for p, tokens in zip(prompts, got):
        assert tokens == generate_alone(model, tok, p, 10)
    assert again[0] == got[0]
    def shared(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    # the first prompt is prefilled in full; each other one reuses the most it shares with an earlier one (the
    # history and the word 'question'; the short one its first 40 tokens), the repeat all but its last token
    expected = sum(max(shared(prompts[i], prompts[j]) for j in range(i)) for i in range(1, 6)) + len(prompts[0]) - 1
    assert expected > 4 * len(history) and metrics.prefix_tokens._value.get() == expected

    off = Engine(model, tok, max_batch=4, prefix_cache_bytes=0, metrics=(m := ServeMetrics())).start()
    try:
        assert run_engine(off, prompts[:3], Sampling(max_tokens=10, temperature=0)) == got[:3]
    finally:
        off.stop()
    assert m.prefix_tokens._value.get() == 0 and not off.prefixes.entries


def test_prompts_after_one_system_prompt_are_packed_after_its_stored_keys_and_generate_as_alone(tok):
    """Chat requests that start with the same system prompt: the first is prefilled alone, the others in one packed
    pass that starts from its stored keys/values (each attending to them and to itself), and every request's
    tokens equal model.generate's on its whole prompt."""
    model = tiny_llama()
    def chat(q):   # SmolLM2's template puts its default system prompt (~30 tokens) before every conversation
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    prompts = [chat(q) for q in ("hi", "what is rain?", "name a colour", "two plus two", "tell a joke", "bye now")]
    common = min(next(i for i, (x, y) in enumerate(zip(p, prompts[0])) if x != y) for p in prompts[1:])
    assert common >= 16
    passes = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: passes.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    engine = Engine(model, tok, max_batch=8, max_queue=16, metrics=(metrics := ServeMetrics()))
    try:
        got = run_engine(engine, prompts, Sampling(max_tokens=8, temperature=0))
    finally:
        engine.stop()
        hook.remove()
    for p, tokens in zip(prompts, got):
        assert tokens == generate_alone(model, tok, p, 8)
    prefills = [n for n in passes if n > 1]
    assert prefills == [len(prompts[0]), sum(len(p) - common for p in prompts[1:])], prefills
    assert metrics.prefix_tokens._value.get() == common * (len(prompts) - 1)


def test_a_prompt_with_a_long_stored_match_is_not_packed_down_to_a_shorter_one(tok):
    """A resent 260-token history and a prompt sharing only its first 40 tokens match the same stored prompt:
    packing them would make the first prefill 220 tokens it could reuse, so they run in separate passes."""
    from taoke.ship.serve.engine import Generation
    from taoke.ship.serve.text import TextStream

    engine = Engine(tiny_llama(), tok, max_batch=4)
    history = list(range(100, 360))
    engine.prefixes.add(history + [1], engine_cache(engine, len(history) + 1))

    def admitted(ids):
        gen = Generation(ids, Sampling(max_tokens=1, temperature=0), TextStream(tok), 1e9, None)
        gen.prefix, gen.reused = engine.prefixes.match(ids)
        return gen

    resend, again, short = admitted(history + [5, 6]), admitted(history + [7]), admitted(history[:40] + [9, 9])
    assert (resend.reused, again.reused, short.reused) == (260, 260, 40)
    assert engine._fits([resend], again) and not engine._fits([resend], short)


def engine_cache(engine, n):
    """A batch-1 transformers cache of n positions shaped like the engine's model's."""
    from transformers import DynamicCache

    cfg = engine.model.config
    cache = DynamicCache()
    kv_heads = cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.zeros(1, kv_heads, n, head_dim), torch.zeros(1, kv_heads, n, head_dim), layer)
    return cache


def test_prefix_store_keeps_to_its_byte_budget_dropping_the_least_recently_used():
    from transformers import DynamicCache

    from taoke.ship.serve.prefix import PrefixStore

    def cache_of(n):   # one layer, 2 kv heads x n positions x 4 dims of fp32: 64 n bytes
        c = DynamicCache()
        c.update(torch.arange(2 * n * 4, dtype=torch.float32).view(1, 2, n, 4), torch.zeros(1, 2, n, 4), 0)
        return c

    store = PrefixStore(max_bytes=64 * 250, min_tokens=4)
    a, b, c = list(range(100)), list(range(50)) + [999] * 50, [5] * 100
    for ids in (a, b):
        store.add(ids, cache_of(100))
    assert store.bytes == 2 * 6400
    hit, n = store.match(list(range(60)) + [1])     # shares 60 tokens with a, 50 with b
    assert hit is not None and n == 60 and torch.equal(hit.keys[0], cache_of(100).layers[0].keys[0])
    store.add(c, cache_of(100))                      # over budget: b, used least recently, goes
    assert store.bytes == 2 * 6400 and store.match(b)[1] == 50   # now only a's first 50 match it
    assert store.match(a)[1] == 99                   # the whole prompt but its last token
    assert store.match([1, 2, 3])[0] is None         # no match at all


FAMILIES = {"qwen2": {}, "qwen3": {"head_dim": 16}, "gemma": {"head_dim": 16}, "phi3": {}, "gpt2": {},
            "gpt_neox": {}, "stablelm": {}, "starcoder2": {}, "cohere": {}, "olmo": {},
            "falcon": {}}   # multi-query by default: one kv head whatever num_key_value_heads says


def tiny_family(family: str):
    """A 2-layer model of a transformers family from its real config class (byte-sized vocabulary), weights
    sharpened as tiny_llama's, norms and biases moved off their init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              **FAMILIES[family])
    if not hasattr(AutoConfig.for_model(family), "num_key_value_heads"):
        kw.pop("num_key_value_heads")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim == 2 else p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_greedy_tokens_equal_model_generate_for_each_family(tok, family):
    """Batched, joining and leaving, every family's requests get exactly what transformers' model.generate gives
    each prompt alone (biases in q/k/v, q/k norms, partial rotary, learned positions, parallel blocks, a
    multi-query cache laid out unlike the config's head counts)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 17, 30, 12)]
    engine = Engine(tiny_family(family), tok, max_batch=3, max_model_len=1024).start()
    try:
        got = run_engine(engine, prompts, Sampling(max_tokens=10, temperature=0))
    finally:
        engine.stop()
    assert sum(len(t) for t in got) >= 30     # the models say something: equal lists are not two empty answers
    reference = tiny_family(family)
    for p, tokens in zip(prompts, got):
        x = torch.tensor([p])
        ref = reference.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                                 pad_token_id=0)[0, len(p):].tolist()
        assert tokens == (ref[:ref.index(2)] if 2 in ref else ref)


def test_a_prompt_that_fails_after_the_forward_pass_is_answered_with_an_error_not_left_waiting(tok, monkeypatch):
    engine = Engine(tiny_llama(), tok, max_batch=4)

    def broken(*args, **kwargs):
        raise RuntimeError("no room")
    monkeypatch.setattr(engine.kv, "load_row", broken)

    async def go():
        loop = asyncio.get_running_loop()
        gens = [engine.submit(tok(f"hello {i}")["input_ids"], Sampling(max_tokens=4, temperature=0), 60, loop)
                for i in range(2)]
        engine.start()
        return [await asyncio.wait_for(g.events.get(), timeout=60) for g in gens]
    try:
        events = asyncio.run(go())
    finally:
        engine.stop()
    assert [e[0] for e in events] == ["error", "error"] and all("no room" in e[1] for e in events)


def test_engine_sampling_is_reproducible_with_a_seed_whatever_the_batch(tok):
    model = tiny_llama()
    prompt = tok("tell me something")["input_ids"]
    engine = Engine(model, tok, max_batch=4).start()
    try:
        alone = run_engine(engine, [prompt], Sampling(max_tokens=10, temperature=0.9, top_p=0.9, seed=7))[0]
        crowd = run_engine(engine, [prompt] * 3 + [tok("other")["input_ids"]],
                           Sampling(max_tokens=10, temperature=0.9, top_p=0.9, seed=7))
    finally:
        engine.stop()
    assert crowd[:3] == [alone] * 3


def test_engine_queue_is_bounded(tok):
    engine = Engine(tiny_llama(), tok, max_batch=1, max_queue=2)   # not started: nothing leaves the queue
    loop = asyncio.new_event_loop()
    try:
        for _ in range(2):
            engine.submit([1, 2, 3], Sampling(max_tokens=4, temperature=0), 60, loop)
        with pytest.raises(QueueFull) as e:
            engine.submit([1, 2, 3], Sampling(max_tokens=4, temperature=0), 60, loop)
        assert e.value.retry_after >= 1
    finally:
        loop.close()


def test_engine_refuses_hybrid_layers_and_windows_it_cannot_see(tok):
    model = tiny_llama()
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(ModelError, match="layer types.*--engine vllm"):
        Engine(model, tok)
    model.config.layer_types = ["sliding_attention", "full_attention"]   # and no window size
    with pytest.raises(ModelError, match="no window size.*--engine vllm"):
        Engine(model, tok)


def tiny_sliding(family: str):
    """A 2-layer Mistral (every layer slides), Gemma2 (sliding and full layers alternate, logit softcapping, eager
    attention) or Gemma3 (sliding layers, local RoPE) over a 48-token window, with smollm2's vocabulary and
    sharpened weights as tiny_llama."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                              MistralForCausalLM)

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, sliding_window=48, pad_token_id=2,
                  eos_token_id=2, bos_token_id=1)
    cfg, cls = {"mistral": (MistralConfig, MistralForCausalLM), "gemma2": (Gemma2Config, Gemma2ForCausalLM),
                "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    cfg = cfg(**common, **({} if family == "mistral" else {"head_dim": 16}))
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_models_are_served_within_their_window(tok, family):
    """Within its window a sliding layer sees every earlier token, so with contexts capped there the engine serves
    the model and every request's tokens equal model.generate's alone; a longer context is refused, naming the cap
    (which `taoke serve` applies itself when no --max-model-len is given)."""
    from taoke.ship.serve.app import ServeSettings
    from taoke.ship.serve.language import LanguageService

    model = tiny_sliding(family)
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else "sdpa")
    with pytest.raises(ModelError, match="over 48 tokens and a context of 1024.*--max-model-len 48 or less"):
        Engine(model, tok, max_model_len=1024)
    service = LanguageService(model, tok, ServeSettings(model_id="m"), ServeMetrics())
    assert service.max_model_len == 48 and service.engine.max_model_len == 48
    prompts = [tok(f"{'word ' * (3 * i + 1)}question {i}")["input_ids"] for i in range(5)]
    assert max(len(p) for p in prompts) + 12 < 48
    engine = Engine(model, tok, max_batch=3, max_model_len=48).start()
    try:
        got = run_engine(engine, prompts, Sampling(max_tokens=12, temperature=0))
    finally:
        engine.stop()
    assert sum(len(t) for t in got) >= 30
    reference = tiny_sliding(family)
    for p, tokens in zip(prompts, got):
        assert tokens == generate_alone(reference, tok, p, 12)


# ------------------------------------------------------------------------------------------------ seal

def test_sealed_file_round_trip_and_every_kind_of_tampering(tmp_path):
    key = new_key(tmp_path / "k")
    assert parse_key((tmp_path / "k").read_bytes(), "k") == key
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    src = tmp_path / "w.safetensors"
    data = bytes(range(256)) * 1000
    src.write_bytes(data)
    sealed = tmp_path / "w.safetensors.sealed"
    encrypt_file(src, sealed, "w.safetensors", key, hashlib.sha256(data).hexdigest())
    assert data[:64] not in sealed.read_bytes()
    assert decrypt_file(sealed, "w.safetensors", key) == data
    with pytest.raises(ModelError, match="key is wrong or the file was changed"):
        decrypt_file(sealed, "w.safetensors", bytes(32))
    with pytest.raises(ModelError, match="renamed or swapped"):
        decrypt_file(sealed, "other.safetensors", key)
    raw = sealed.read_bytes()
    for at in (20, 40, len(raw) // 2, len(raw) - 1):      # header, header, ciphertext, tag
        flipped = tmp_path / "flipped.sealed"
        flipped.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])
        with pytest.raises(ModelError):
            decrypt_file(flipped, "w.safetensors", key)
    with pytest.raises(ModelError, match="never overwrites"):
        new_key(tmp_path / "k")


def test_seal_key_forms(tmp_path):
    import base64
    key = bytes(range(32))
    assert parse_key(key.hex().encode() + b"\n", "x") == key
    assert parse_key(base64.b64encode(key), "x") == key
    assert parse_key(base64.urlsafe_b64encode(key).rstrip(b"="), "x") == key
    with pytest.raises(ModelError, match="not an AES-256 key"):
        parse_key(b"password123", "x")


# ------------------------------------------------------------------------------------------------ alerts

def test_alert_rules_use_only_metrics_the_server_exports():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "taoke-alerts.yml").read_text())
    metrics = ServeMetrics(queue_capacity=4)
    metrics.request("/v1/chat/completions", 200, 0.5)       # labelled series appear once observed
    exported = metrics.exposition()[0].decode()
    names = {line.split("{")[0].split(" ")[0] for line in exported.splitlines() if line and not line.startswith("#")}
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"TaokeHighErrorRate", "TaokeHighLatencyP95", "TaokeQueueSaturated"}
    import re
    for a in alerts:
        used = set(re.findall(r"\b(taoke_[a-z_]+)", a["expr"]))
        assert used and used <= names, (a["alert"], used - names)
        assert a["labels"]["severity"] and a["annotations"]["summary"]
    json.dumps(rules)


# ------------------------------------------------------------------------------------------------ cli


def test_serve_refuses_a_public_binding_without_keys_before_loading_anything(taoke_main, tmp_path):
    code, _, err = taoke_main("serve", tmp_path / "no-such-run", "--host", "0.0.0.0")
    assert code == 2 and "--api-keys" in err


def test_vllm_engine_says_what_it_needs_when_vllm_is_missing(tmp_path):
    import importlib.util

    from taoke.ship.serve.upstream import launch_vllm, vllm_command

    cmd = vllm_command(tmp_path, "m", 1234, ["--dtype=bfloat16"])
    assert cmd[1:4] == ["serve", str(tmp_path), "--served-model-name"] and "127.0.0.1" in cmd
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ModelError, match="pip install vllm"):
            launch_vllm(tmp_path, "m", [])

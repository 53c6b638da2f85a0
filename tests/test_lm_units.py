"""Unit tests of the causal-LM building blocks: data and masks, packing, chunked CE, merge, parity, DPO."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taoke.errors import DataError
from taoke.lm.data import (IGNORE, encode_chat, encode_conversations, encode_documents, read_conversations,
                           read_dpo_pairs, read_text_documents)
from taoke.lm.loss import lm_loss_sum, linear_cross_entropy_sum, reference_loss_sum
from taoke.models.parts import unwrap
from taoke.lm.pack import concat_row, first_fit, pack_rows, packed_batch, padded_batch
from tests.lm_helpers import adapted, smollm_tokenizer, tiny_llama, train

ROOT_DATA = "data/chatterbot/dialogs.jsonl"


@pytest.fixture(scope="module")
def tok():
    return smollm_tokenizer()


def _assistant_text(tok, row):
    return tok.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE])


# ---------------------------------------------------------------------------------------------- data

def test_multiturn_labels_cover_assistant_turns_only(tok):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]
    row = encode_chat(tok, msgs)
    assert len(row["input_ids"]) == len(row["labels"])
    assert _assistant_text(tok, row) == "Hello!<|im_end|>\nFine, thanks.<|im_end|>\n"
    # the user turns, the default system prompt and the role headers carry no loss
    masked = tok.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l == IGNORE])
    assert "Hi there" in masked and "How are you?" in masked and "Hello!" not in masked
    assert "<|im_start|>assistant\n" in masked


def test_named_template_and_real_multiturn_file(tok, tmp_path):
    from taoke.lm.data import set_chat_template

    convs = read_conversations(ROOT_DATA)
    multi = [c for c in convs if len(c) >= 4][:3]
    rows = encode_conversations(tok, multi, 512)
    for conv, row in zip(multi, rows):
        text = _assistant_text(tok, row)
        for m in conv:
            assert (m["content"] in text) == (m["role"] == "assistant") or m["content"] in [
                x["content"] for x in conv if x["role"] == "assistant"]
    tok2 = smollm_tokenizer()
    set_chat_template(tok2, "plain")
    row = encode_chat(tok2, multi[0])
    assert _assistant_text(tok2, row).strip().startswith(multi[0][1]["content"])
    assert "User:" not in _assistant_text(tok2, row)


def test_readers_alpaca_sharegpt_dpo_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}]))
    assert read_conversations(tmp_path / "a.json") == [[{"role": "user", "content": "Add\n\n1+1"},
                                                         {"role": "assistant", "content": "2"}]]
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                                    {"from": "gpt", "value": "yo"}]}) + "\n")
    assert read_conversations(tmp_path / "s.jsonl")[0][1] == {"role": "assistant", "content": "yo"}
    pairs = read_dpo_pairs("data/chatterbot-lm/dpo_pairs.jsonl")
    assert len(pairs) == 1007 and pairs[0]["chosen"] != pairs[0]["rejected"]
    assert len(read_conversations("data/chatterbot-lm/alpaca.json")) == 1007
    docs = read_text_documents(sorted((tmp_path.parent / tmp_path.name).glob("*.none")) or
                               ["data/chatterbot-lm/text/ai.txt", "data/chatterbot-lm/text/food.txt"])
    assert len(docs) == 2


def test_documents_end_with_eos_and_never_join(tok):
    rows = encode_documents(tok, ["first doc " * 50, "second doc"], max_len=64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert rows[-1]["input_ids"][-1] == tok.eos_token_id
    assert sum(r["input_ids"].count(tok.eos_token_id) for r in rows) == 2


@pytest.mark.parametrize("content, needle", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "message 0"),
    ('{"text": "x"}\n', "unknown record"),
    ('{"messages": [}\n', "not valid JSON"),
])
def test_malformed_rows_name_file_and_line(tmp_path, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' + content)
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{needle}"):
        read_conversations(f)


def test_bad_dpo_pair_is_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: 'chosen' and 'rejected'"):
        read_dpo_pairs(f)


# ---------------------------------------------------------------------------------------------- chunked CE

def test_chunked_ce_matches_plain_ce_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(300, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1000, 64, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    loss = linear_cross_entropy_sum(h, w, t, chunk=37)
    (loss * 0.5).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (ref * 0.5).backward()
    assert torch.allclose(loss, ref, rtol=1e-10)
    assert torch.allclose(gh, h.grad, rtol=1e-8, atol=1e-10)
    assert torch.allclose(gw, w.grad, rtol=1e-8, atol=1e-10)


def test_model_loss_matches_transformers_loss(tok):
    model = tiny_llama()
    rows = encode_conversations(tok, read_conversations(ROOT_DATA)[:6], 128)
    batch = padded_batch(rows, tok.pad_token_id)
    ours, n1 = lm_loss_sum(model, batch, chunk=50)
    ref, n2 = reference_loss_sum(model, batch)
    assert n1 == n2 and torch.allclose(ours, ref, rtol=1e-5)
    # and transformers' own mean loss agrees
    hf = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert torch.allclose(ours / n1, hf, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- packing

def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = lm_loss_sum(model, batch)
    (loss / n).backward()
    return float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_packed_and_unpacked_training_agree(tok):
    model = tiny_llama()
    rows = encode_conversations(tok, read_conversations(ROOT_DATA)[::40], 256)
    packed = pack_rows(rows, 256, tok.pad_token_id)
    assert len(packed) < len(rows)  # several examples really share a row
    l_pad, g_pad = _loss_and_grads(model, padded_batch(rows, tok.pad_token_id))
    pb = packed_batch(packed)
    l_pack, g_pack = _loss_and_grads(model, pb)
    assert l_pack == pytest.approx(l_pad, rel=1e-5)
    for k in g_pad:
        assert torch.allclose(g_pad[k], g_pack[k], rtol=1e-3, atol=1e-6), k
    # one optimizer step on each path lands on the same next loss
    import copy

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m, batch in ((a, padded_batch(rows, tok.pad_token_id)), (b, pb)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        _loss_and_grads(m, batch)
        opt.step()
    assert _loss_and_grads(a, pb)[0] == pytest.approx(_loss_and_grads(b, pb)[0], rel=1e-5)
    # control: the same packed row without position resets lets examples see each other -> different loss
    leaky = dict(pb, position_ids=torch.arange(pb["input_ids"].shape[1]).expand_as(pb["input_ids"]))
    assert abs(_loss_and_grads(model, leaky)[0] - l_pad) > 1e-3



def test_first_fit_against_hand_assignment():
    # capacity 7, lengths 5 4 3 2: 5 opens bin 0, 4 opens bin 1, 3 joins bin 1 (7), 2 joins bin 0 (7)
    assert first_fit([5, 4, 3, 2], 7, [0, 1, 2, 3]) == [[0, 3], [1, 2]]
    # looking back one bin only, 2 finds bin 1 full and opens a third
    assert first_fit([5, 4, 3, 2], 7, [0, 1, 2, 3], window=1) == [[0], [1, 2], [3]]
    row = concat_row([{"input_ids": [7, 8, 9], "labels": [7, 8, 9]}, {"input_ids": [4, 5], "labels": [-100, 5]}],
                     6, 0, segments=[3, 1])
    assert row["input_ids"] == [7, 8, 9, 4, 5, 0] and row["labels"] == [-100, 8, 9, -100, 5, -100]
    assert row["position_ids"] == [0, 1, 2, 0, 1, 0] and row["segment"] == [3, 3, 3, 1, 1, -1]

# ---------------------------------------------------------------------------------------------- merge + parity

def _adapted(method):
    model, _ = adapted(tiny_llama(), method=method, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
            if "magnitude" in n:
                p.mul_(1.1)
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_adapter_outputs(tok, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from taoke.lm.merge import parity_check, save_merged

    model = _adapted(method)
    ids = torch.randint(0, 49152, (2, 24))
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    out = save_merged(model, tok, tmp_path / "merged", shard_mb=1)  # tiny shards: the streaming path
    assert (out / "model.safetensors.index.json").exists() and (out / "chat_template.jinja").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (a - base_logits).abs().max() > 1e-2  # the adapter really changes the outputs
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    report = parity_check(out, model, tok, ["What is AI?"], max_new_tokens=6)
    assert report["max_logit_diff"] < 1e-3 and all(g["identical"] for g in report["generations"])


def test_parity_check_catches_changed_weight_and_lost_template(tok, tmp_path):
    from safetensors.torch import load_file, save_file

    from taoke.lm.merge import ParityError, parity_check, save_merged

    model = _adapted("lora")
    out = save_merged(model, tok, tmp_path / "m")
    f = out / "model.safetensors"
    state = load_file(f)
    key = "model.layers.1.mlp.down_proj.weight"
    state[key] = state[key] * 1.5
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(ParityError, match="logits differ"):
        parity_check(out, model, tok, ["What is AI?"], max_new_tokens=4)

    out2 = save_merged(model, tok, tmp_path / "m2")
    (out2 / "chat_template.jinja").unlink()
    with pytest.raises(ParityError, match="chat template"):
        parity_check(out2, model, tok, ["What is AI?"], max_new_tokens=4)


# ---------------------------------------------------------------------------------------------- DPO, predict

def test_dpo_loss_and_sequence_logprobs(tok):
    from taoke.lm.dpo import dpo_loss, encode_pairs, pair_batch, sequence_logprobs

    z = torch.zeros(3)
    loss, acc, _ = dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(0.6931, abs=1e-4)
    loss, acc, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-10.0]), z[:1], z[:1], beta=0.1)
    assert acc == 1.0 and loss.item() < 0.32

    model = tiny_llama()
    pairs = encode_pairs(tok, read_dpo_pairs("data/chatterbot-lm/dpo_pairs.jsonl")[:2], 128)
    batch = pair_batch(pairs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp = sequence_logprobs(model, batch)
        ref, n = reference_loss_sum(model, {k: batch[k][:1] for k in batch})
    assert lp.shape == (4,) and lp[0].item() == pytest.approx(-ref.item(), rel=1e-5)


def test_packed_dpo_pairs_give_each_sequence_the_log_prob_it_has_alone(tok):
    """Chosen and rejected sequences packed several to a row (each attending only to itself) score what each
    scores alone in a batch of one, in the same order (chosen first), with far fewer padded positions."""
    from taoke.lm.dpo import encode_pairs, pair_batch, sequence_logprobs

    model = tiny_llama()
    pairs = encode_pairs(tok, read_dpo_pairs("data/chatterbot-lm/dpo_pairs.jsonl")[:8], 256)
    packed = pair_batch(pairs, tok.pad_token_id, "cpu", pack_len=256)
    padded = pair_batch(pairs, tok.pad_token_id, "cpu")
    assert packed["input_ids"].numel() < padded["input_ids"].numel() and "attention_mask" not in packed
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    with torch.no_grad():
        got = sequence_logprobs(model, packed)
        alone = []
        for s in seqs:   # the reference: every sequence run by itself, summed by hand over its labelled tokens
            x = torch.tensor([s["input_ids"]])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            y = torch.tensor(s["labels"][1:])
            alone.append(sum(float(logp[i, t]) for i, t in enumerate(y.tolist()) if t != -100))
    assert got.shape == (16,)
    assert torch.allclose(got, torch.tensor(alone), atol=1e-3, rtol=1e-4), (got, alone)


@pytest.mark.parametrize("packing", [True, False])
def test_dpo_reference_has_the_policys_numerics(tok, packing):
    """LoRA starts with B = 0, so the policy is the reference and DPO's first loss is log 2 and its margin 0
    (Rafailov et al. 2023), in bf16 as in fp32: the reference log-probs must be computed in the precision the
    policy trains in. An fp32 reference against a bf16 policy starts every pair with a random margin."""
    from taoke.lm.dpo import encode_pairs, train_dpo
    from tests.lm_helpers import configs

    pairs = encode_pairs(tok, read_dpo_pairs("data/chatterbot-lm/dpo_pairs.jsonl")[:8], 256)
    for precision in ("fp32", "bf16"):
        train_cfg, lm_cfg, adapt_cfg = configs(method="lora", r=4, target_modules="all-linear", precision=precision,
                                               max_steps=1, batch_size=4, lr=1e-4, seq_len=256, packing=packing,
                                               checkpoint_every=None)
        model, _ = adapted(tiny_llama(), **adapt_cfg.model_dump())
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        first = train_dpo(model, tok, pairs, train_cfg, lm_cfg).steps[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), (precision, first)
        assert first["margin"] == pytest.approx(0.0, abs=1e-5), (precision, first)
        # frozen weights, held in bf16 while training ran in bf16, are their exact fp32 selves again
        assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_dpo_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tok, tmp_path):
    """A bf16 LoRA DPO run resumed from its step-2 checkpoint reaches the uninterrupted run's adapter bit for bit."""
    from taoke.lm.dpo import encode_pairs, train_dpo
    from tests.lm_helpers import configs

    pairs = encode_pairs(tok, read_dpo_pairs("data/chatterbot-lm/dpo_pairs.jsonl")[:16], 256)
    train_cfg, lm_cfg, adapt_cfg = configs(method="lora", r=4, target_modules="all-linear", precision="bf16",
                                           max_steps=4, batch_size=4, lr=1e-3, seq_len=256, checkpoint_every=2)

    def adapter(resume: bool) -> tuple[dict, list[int]]:
        model, _ = adapted(tiny_llama(), **adapt_cfg.model_dump())
        ran = []
        train_dpo(model, tok, pairs, train_cfg, lm_cfg, checkpoint_dir=tmp_path, resume=resume,
                  on_step=lambda row: ran.append(row["step"]))
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, ran

    whole, ran = adapter(resume=False)        # leaves its step-2 checkpoint behind
    resumed, ran_again = adapter(resume=True)  # a fresh model picks up at step 3
    assert ran == [1, 2, 3, 4] and ran_again == [3, 4]
    assert sorted(whole) == sorted(resumed) and all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_dpo_visits_every_group_once_per_epoch_in_a_new_order():
    from taoke.lm.dpo import group_order

    epochs = [[group_order(7, 3, e * 7 + i) for i in range(7)] for e in range(3)]
    assert all(sorted(order) == list(range(7)) for order in epochs)
    assert len({tuple(order) for order in epochs}) > 1, epochs   # not the same order every epoch
    assert epochs[0] != list(range(7))                          # not the file's order
    assert [group_order(7, 3, i) for i in range(7)] == epochs[0]  # the same seed, the same batches (resume)


def test_predict_file_writes_completions(tok, tmp_path):
    from taoke.inference.language import LanguagePredictor
    from taoke.lm.data import read_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is AI?"}\n"Hello"\n{"messages": [{"role": "user", "content": "Hi"}, '
                       '{"role": "assistant", "content": "ref"}]}\n')
    read = read_prompts(prompts)
    assert read[2] == [{"role": "user", "content": "Hi"}]  # the reference answer is not part of the prompt
    predictor = LanguagePredictor(tiny_llama(), tok, {"task": "sft"}, tmp_path)
    rows = predictor.predict(read, max_new_tokens=4)
    assert [r["prompt"] for r in rows] == ["What is AI?", "Hello", "Hi"]


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "dora"])
def test_train_lm_methods_reduce_training_loss(tok, method):
    rows = encode_conversations(tok, read_conversations(ROOT_DATA)[:8], 128)
    model = tiny_llama()
    hist = train(model, tok, rows, rows[:4], method=method, layers=1, lr=3e-3, max_steps=6, batch_size=2,
                 seq_len=256, warmup_ratio=0.0, r=4, dropout=0.0)
    assert hist.steps[-1]["loss"] < hist.steps[0]["loss"]
    # the 8 examples (~400 tokens) pack into the 2 rows of one step: each step reads every example once, and
    # the count is of real tokens, not of the 2 x 256 positions with padding
    assert hist.tokens == 6 * sum(len(r["input_ids"]) for r in rows) < 6 * 2 * 256
    assert hist.tokens_per_s == pytest.approx(hist.tokens / hist.seconds)
    assert hist.adaptation["trainable_params"] < hist.adaptation["total_params"] or method == "full"


def test_generate_eval_metrics(tok):
    from taoke.evaluate.text_metrics import TEXT_METRICS as METRICS
    from taoke.lm.generate import generate_eval

    assert METRICS["exact_match"]("Paris", " paris ") == 1.0
    assert METRICS["contains"]("It is Paris.", "paris") == 1.0
    assert 0 < METRICS["rouge_l"]("the cat sat", "the cat sat down") < 1
    res = generate_eval(tiny_llama(), tok, ["What is AI?", "Hi"], ["AI", "Hello"], metric="rouge_l",
                        max_new_tokens=3)
    assert res["n"] == 2 and len(res["samples"]) == 2 and 0 <= res["score"] <= 1


def test_frozen_weights_held_in_bf16_then_restored_exactly(tok):
    from taoke.lm.frozen import FrozenInLowPrecision

    model = _adapted("lora")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = packed_batch(pack_rows(encode_conversations(tok, read_conversations(ROOT_DATA)[:4], 128), 256, 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = lm_loss_sum(model, batch)
    with FrozenInLowPrecision(model, torch.bfloat16) as held:
        names = {f"{n}.weight" for n in held.modules}
        params = dict(model.named_parameters())
        assert names and all(params[n].dtype == torch.bfloat16 for n in names)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA stays fp32
        assert params["base_model.model.model.embed_tokens.weight"].dtype == torch.float32  # tied to the head
        assert unwrap(model).get_output_embeddings().weight.dtype == torch.bfloat16  # the head's own copy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = lm_loss_sum(model, batch)
    assert torch.equal(plain, low)  # autocast casts to bf16 anyway: same numbers
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], w) for n, w in frozen.items())
    assert held.file is None
    assert unwrap(model).get_output_embeddings().weight is unwrap(model).get_input_embeddings().weight  # re-tied


def test_dora_keeps_its_frozen_weights_in_fp32():
    """DoRA's magnitude reads the base weight's fp32 column norms: the context leaves a DoRA model as it is."""
    from taoke.lm.frozen import FrozenInLowPrecision

    model, _ = adapted(tiny_llama(), method="dora", r=4, dropout=0.0)
    with FrozenInLowPrecision(model, torch.bfloat16) as held:
        assert not held.modules and held.file is None
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_rouge_l_scores_cjk_text_and_bits_per_byte_ignore_tokenization(tok):
    from taoke.derive.language import bits_per_byte as _bits_per_byte
    from taoke.evaluate.text_metrics import TEXT_METRICS as METRICS

    assert METRICS["rouge_l"]("是的,我受到造物者", "是的,我受到造物者的启发") > 0.8  # the default tokenizer gives 0
    assert METRICS["rouge_l"]("running dogs", "run dog") == 1.0  # ASCII keeps the stemmed scorer
    rows = encode_conversations(tok, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "你好"}]], 64)
    n_labels = sum(1 for t in rows[0]["labels"][1:] if t != IGNORE)
    n_bytes = len("你好<|im_end|>\n".encode())
    scores = {"loss": 2.0, "tokens": n_labels}
    assert _bits_per_byte(scores, rows, tok) == pytest.approx(2.0 * n_labels / math.log(2) / n_bytes)


def test_fast_lora_forward_matches_peft_and_is_put_back(tok):
    from taoke.lm.fast_lora import FastLoraForward

    model = _adapted("lora")
    batch = packed_batch(pack_rows(encode_conversations(tok, read_conversations(ROOT_DATA)[:4], 128), 256, 0))

    def loss_and_grads(bf16=True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        return float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    _, fp32_grads = loss_and_grads(bf16=False)
    peft_loss, peft_grads = loss_and_grads()
    with FastLoraForward(model) as fast:
        assert len(fast.swapped) == 7 * len(unwrap(model).model.layers)
        fast_loss, fast_grads = loss_and_grads()
        with torch.no_grad():  # outside autocast it is PEFT's own forward
            assert torch.equal(fast.swapped[0](torch.ones(2, 64)),
                               type(fast.swapped[0]).forward(fast.swapped[0], torch.ones(2, 64)))
    assert all("forward" not in vars(m) for m in model.modules())  # PEFT's forward again
    # the same bf16 operands, the adapter's update added in fp32: equal up to bf16 rounding, and the gradients at
    # least as close to fp32 training's as PEFT's own bf16 forward gives them
    assert fast_loss == pytest.approx(peft_loss, rel=2e-3)

    def cos(a, b):
        return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    for k, g in peft_grads.items():
        assert cos(g, fast_grads[k]) > 0.98, k
    assert np.mean([cos(fast_grads[k], g) for k, g in fp32_grads.items()]) >= \
        np.mean([cos(peft_grads[k], g) for k, g in fp32_grads.items()]) - 1e-4
    dora, _ = adapted(tiny_llama(), method="dora", r=4, dropout=0.0)
    with FastLoraForward(dora) as fast:  # layers the fused forward does not compute exactly keep PEFT's
        assert fast.swapped == []


def test_fast_lora_adds_the_adapters_update_in_fp32():
    """Under bf16 autocast an adapter update 1% the size of its layer's output survives the fused forward (added to
    the output in fp32) and is mostly rounded away in PEFT's bf16 sum. Reference: the update in fp32 (x A^T B^T s)."""
    from taoke.lm.fast_lora import FastLoraForward

    torch.manual_seed(0)
    model, _ = adapted(tiny_llama(), method="lora", r=4, dropout=0.0)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    name = layer.active_adapters[0]
    x = torch.randn(64, layer.in_features)
    with torch.no_grad():
        base = x @ layer.base_layer.weight.T
        torch.nn.init.normal_(layer.lora_B[name].weight)
        unit = (x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T) * layer.scaling[name]
        layer.lora_B[name].weight.mul_(0.01 * base.std() / unit.std())
        update = unit * (0.01 * base.std() / unit.std())
        b = layer.lora_B[name].weight.clone()

    def measured_update() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with_update = layer(x).float()
            layer.lora_B[name].weight.zero_()
            without = layer(x).float()
            layer.lora_B[name].weight.copy_(b)
        return with_update - without

    def error(d: torch.Tensor) -> float:
        return float((d - update).norm() / update.norm())

    peft_error = error(measured_update())
    with FastLoraForward(model):
        fused_error = error(measured_update())
    assert fused_error < 0.02, fused_error
    assert peft_error > 5 * fused_error, (peft_error, fused_error)


def test_fast_lora_forward_applies_dropout_as_peft_does(tok):
    """LoRA dropout stays on the fused path: PEFT's masks (the same draws from the same seed, on the adapter
    input only) give the same loss and gradients; another seed gives another loss."""
    from taoke.lm.fast_lora import FastLoraForward

    model, _ = adapted(tiny_llama(), method="lora", r=4, dropout=0.3)
    for name, p in model.named_parameters():
        if "lora_B" in name:   # B starts at zero, which would hide the adapter branch (and its dropout)
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = packed_batch(pack_rows(encode_conversations(tok, read_conversations(ROOT_DATA)[:4], 128), 256, 0))

    def loss_and_grads(seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = lm_loss_sum(model, batch)
        (loss / n).backward()
        return float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    peft_loss, peft_grads = loss_and_grads(0)
    other_seed, _ = loss_and_grads(1)
    with FastLoraForward(model) as fast:
        assert len(fast.swapped) == 7 * len(unwrap(model).model.layers)
        fast_loss, fast_grads = loss_and_grads(0)
    assert fast_loss == pytest.approx(peft_loss, rel=1e-3)
    assert abs(other_seed - peft_loss) > 10 * abs(fast_loss - peft_loss)
    for k, g in peft_grads.items():
        assert F.cosine_similarity(g.flatten(), fast_grads[k].flatten(), dim=0) > 0.99, k


def test_lora_trains_new_token_rows_and_merge_writes_them(tok, tmp_path):
    """expand_vocab + LoRA: the new rows train (PEFT trainable tokens) and the merged model carries them."""
    from transformers import AutoModelForCausalLM

    from taoke.lm.merge import parity_check, save_merged

    rows = encode_conversations(tok, read_conversations(ROOT_DATA)[:24], 128)
    used = sorted({t for r in rows for t in r["input_ids"]})[-2:]  # rows the data actually reaches
    model = tiny_llama()
    before = model.get_input_embeddings().weight.detach().clone()
    hist = train(model, tok, rows, trainable_tokens=used, method="lora", r=4, alpha=8, dropout=0.0, lr=1e-2,
                 max_steps=3, batch_size=2, seq_len=128)
    assert hist.adaptation["trainable_tokens"] == 2
    out = save_merged(hist.model, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    after = merged.get_input_embeddings().weight.detach()
    changed = (after - before).abs().amax(dim=1) > 1e-6
    assert changed[used].all() and int(changed.sum()) == 2  # those rows and no others
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight  # still tied
    report = parity_check(out, hist.model, tok, ["What is AI?"], max_new_tokens=6)
    assert report["max_logit_diff"] <= report["tolerance"] and report["generations"][0]["identical"]

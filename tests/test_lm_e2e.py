"""End to end on smollm2-135m and a small real slice (chatterbot): SFT (LoRA) lowers held-out loss below
the base's, the merged model passes the parity check, `taoke chat` answers through a pseudo-terminal;
DPO and continued pretraining likewise (slow)."""

import os
import sys

import pytest
import torch

from taoke.lm.data import encode_conversations, encode_documents, read_conversations, read_text_documents
from taoke.lm.load import load_causal_lm
from taoke.lm.train import evaluate_lm
from tests.lm_helpers import configs, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIALOGS = os.path.join(ROOT, "data", "chatterbot", "dialogs.jsonl")


def _slice(tok, n_train=48, n_held=24):
    convs = [c for c in read_conversations(DIALOGS) if len(c) == 2]
    # one topic block (tech support), so held-out answers share style with what is trained on
    block = convs[-200:]
    held = block[::8][:n_held]
    train = [c for i, c in enumerate(block) if i % 8][:n_train]
    return encode_conversations(tok, train, 256), encode_conversations(tok, held, 256)


CFG = dict(method="lora", r=8, alpha=16, dropout=0.0, lr=1e-3, max_steps=24, batch_size=1, seq_len=256,
           warmup_ratio=0.1, threads=1, scheduler="cosine", weight_decay=0.0)


def _chat_answers(model_ref, question="What is a computer?"):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "taoke.cli", "chat", str(model_ref), "--max-new-tokens", "24"],
                          cwd=ROOT, encoding="utf-8", timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    child.expect(">>> ")
    child.sendline(question)
    child.expect(">>> ")
    answer = child.before.replace(question, "").strip()
    child.sendline("/reset")
    child.expect("cleared")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return answer


def test_chat_streams_an_answer_from_the_base():
    answer = _chat_answers("smollm2-135m")
    assert len(answer.split()) >= 2, answer


@pytest.mark.slow
def test_sft_lora_lowers_heldout_loss_merges_with_parity_and_chats(tmp_path):
    from taoke.lm.merge import parity_check, save_merged

    torch.set_num_threads(1)
    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    train_rows, held = _slice(tok)
    base = evaluate_lm(model, held, tok.pad_token_id, 256)
    hist = train(model, tok, train_rows, held, **CFG)
    derived = hist.evals[-1]
    assert derived["loss"] < base["loss"] - 0.05, (base, derived)
    assert hist.steps[-1]["loss"] < hist.steps[0]["loss"]
    out = save_merged(hist.model, tok, tmp_path / "model")
    report = parity_check(out, hist.model, tok, ["What is a computer?", "Do you like music?"])
    assert report["max_logit_diff"] <= report["tolerance"] and len(report["generations"]) == 2
    assert len(_chat_answers(out).split()) >= 1


@pytest.mark.slow
def test_dpo_lora_prefers_chosen_answers(tmp_path):
    from taoke.lm.data import read_dpo_pairs
    from taoke.adapt.language import adapt_lm
    from taoke.lm.dpo import encode_pairs, train_dpo

    torch.set_num_threads(1)
    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    pairs = read_dpo_pairs(os.path.join(ROOT, "data", "chatterbot-lm", "dpo_pairs.jsonl"))
    enc = encode_pairs(tok, pairs[::10], 192)
    train_rows, held = enc[:64], enc[64:88]
    train_cfg, lm_cfg, adapt_cfg = configs(**{**CFG, "max_steps": 16, "batch_size": 4, "lr": 5e-4, "beta": 0.1})
    model, _ = adapt_lm(model, adapt_cfg)
    hist = train_dpo(model, tok, train_rows, train_cfg, lm_cfg, eval_pairs=held)
    ev = hist.evals[-1]
    assert ev["dpo_loss"] < 0.6931 and ev["reward_acc"] > 0.5, ev


@pytest.mark.slow
def test_continued_pretraining_full_lowers_heldout_loss(tmp_path):
    torch.set_num_threads(1)
    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    docs = read_text_documents(os.path.join(ROOT, "data", "chatterbot-lm", "text", "tech-support.txt"), separator="\n\n")
    rows = encode_documents(tok, docs, 128)
    train_rows, held = [r for i, r in enumerate(rows) if i % 8], rows[::8]
    base = evaluate_lm(model, held, tok.pad_token_id, 256)
    hist = train(model, tok, train_rows, held, **{**CFG, "method": "freeze", "layers": 24, "lr": 1e-4, "max_steps": 12})
    assert hist.evals[-1]["loss"] < base["loss"], (base, hist.evals[-1])

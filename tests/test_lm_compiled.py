"""torch.compile of the decoder layers: when `auto` turns it on, that a failure falls back to eager, and that
compiled training computes what eager training computes."""

import pytest
import torch

from taoke.errors import RecipeError
from taoke.lm.compiled import COMPILE_MIN_STEPS, CompiledDecoder, toolchain_ready, want_compile
from taoke.lm.data import encode_conversations, read_conversations
from tests.lm_helpers import smollm_tokenizer, tiny_llama, train

CPU = torch.device("cpu")


def test_compile_setting_resolves():
    assert want_compile(True, CPU, 1, packing=False) and want_compile("true", CPU, 1, packing=True)
    assert not want_compile(False, CPU, 10_000, packing=True)
    assert not want_compile("auto", CPU, COMPILE_MIN_STEPS - 1, packing=True)  # too short to repay the compile
    assert not want_compile("auto", CPU, 10_000, packing=False)  # padded batches change shape every step
    assert want_compile("auto", CPU, COMPILE_MIN_STEPS, packing=True) == toolchain_ready(CPU)
    with pytest.raises(RecipeError, match="lm.compile 'sometimes'"):
        want_compile("sometimes", CPU, 10, packing=True)


def test_a_failed_compile_falls_back_to_eager():
    layers = tiny_llama().model.layers

    def probe():
        raise RuntimeError("no C++ compiler")

    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler.*training eagerly"):
        with CompiledDecoder(layers, True, probe) as compiled:
            assert not compiled.active
            assert all(layer._compiled_call_impl is None for layer in layers)


@pytest.mark.slow   # covered in CI (make test-all); the default run keeps a faster sibling
@pytest.mark.skipif(not toolchain_ready(CPU), reason="inductor needs a C++ compiler")
def test_compiled_training_matches_eager():
    tok = smollm_tokenizer()
    rows = encode_conversations(tok, read_conversations("data/chatterbot/dialogs.jsonl")[:40], 128)
    cfg = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "lr": 3e-3, "max_steps": 3, "batch_size": 2,
           "seq_len": 128, "precision": "bf16"}
    runs = {}
    for setting in (False, True):
        runs[setting] = train(tiny_llama(), tok, rows, rows[:6], **cfg, compile=setting)
    assert not runs[False].compiled and runs[True].compiled  # compiled, not fallen back to eager
    assert all(layer._compiled_call_impl is None for layer in runs[True].model.base_model.model.model.layers)
    for eager, compiled in zip(runs[False].steps, runs[True].steps):  # bf16: fused kernels round differently
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=2e-2)
    assert runs[True].evals[-1]["loss"] == pytest.approx(runs[False].evals[-1]["loss"], rel=2e-2)

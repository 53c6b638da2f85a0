"""GPTQ rounding into Q4_0 blocks: the bytes are gguf-py's Q4_0 (its own dequantizer reads them back), GPTQ with no
correlation between inputs is ggml's round-to-nearest exactly, and on a real SmolLM2 projection with the Hessian of
real text it leaves less output error than gguf-py's quantizer."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from taoke.ship.gptq import dequantized, gptq_blocks, gptq_q4_0, pack_q4_0


def test_packed_blocks_are_what_gguf_py_reads():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(5, 96)).astype(np.uint8)
    scales = rng.normal(size=(5, 3)).astype(np.float16)
    packed = pack_q4_0(scales, codes)
    assert packed.shape == (5, 3 * 18)
    np.testing.assert_array_equal(dequantize(packed, Q.Q4_0), dequantized(scales, codes).numpy())


def test_without_input_correlation_gptq_is_round_to_nearest():
    """A diagonal Hessian carries no error from one column to another: every code is ggml's own rounding."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    scales, codes = gptq_q4_0(w, torch.diag(torch.rand(64) + 0.5), damp=0.0)
    np.testing.assert_array_equal(pack_q4_0(scales, codes), quantize(w.numpy(), Q.Q4_0))


def test_odd_widths_are_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        gptq_q4_0(torch.randn(4, 40), torch.eye(40))


def test_less_output_error_than_round_to_nearest_on_a_real_projection():
    from taoke.lm.load import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m", device="cpu")
    name = "model.layers.3.mlp.down_proj"
    proj = dict(model.named_modules())[name]
    seen = []
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().flatten(0, 1)))
    with torch.no_grad():
        for text in TEXTS:
            model(**tok(text, return_tensors="pt"))
    handle.remove()
    x = torch.cat(seen)
    h, w = 2 * x.T @ x / len(x), proj.weight.detach().float()

    def output_error(q: torch.Tensor) -> float:   # ||(W - Q) X^T||^2 over the measured inputs
        return float(((x @ (w - q).T) ** 2).sum())

    rtn = torch.from_numpy(dequantize(quantize(w.numpy(), Q.Q4_0), Q.Q4_0))
    gptq = dequantized(*gptq_q4_0(w, h))
    assert output_error(gptq) < 0.8 * output_error(rtn)


def test_blocks_cover_every_projection_and_leave_the_model_as_it_was():
    from tests.lm_helpers import smollm_tokenizer, tiny_llama

    model, tok = tiny_llama(), smollm_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [tok(t, return_tensors="pt") for t in TEXTS]
    blocks = gptq_blocks(model, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    projections = [k for k in before if k.endswith("_proj.weight")]
    assert sorted(blocks) == sorted(projections) and len(projections) == 7 * 2
    for name, packed in blocks.items():   # gguf-py reads every file's blocks back to a weight of the right shape
        assert dequantize(packed, Q.Q4_0).shape == before[name].shape


TEXTS = ["The committee met on Tuesday to discuss the budget for the new library, which had been delayed twice.",
         "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
         "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in the leaves of plants."]

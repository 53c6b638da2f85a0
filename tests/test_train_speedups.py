"""The training speed-ups must not change what is learned: compact embedding rows and precision choice."""

import pytest
import torch

import taoke.train.classifier as loop
from taoke.models.scratch import TransformerClassifier
from taoke.recipe import TrainConfig
from taoke.train.batches import Encoded
from taoke.train.embedding_rows import UsedRowsEmbedding, compact_input_embedding
from taoke.hardware import cpu_has_bf16
from taoke.train.precision import (BF16_MIN_PARAMS, MIN_SPEEDUP, choose_for_training, choose_precision,
                                   inference_dtype)


def text_data(n=96, vocab_used=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab_used, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    targets = torch.tensor([row[0] % 3 for row in ids])  # learnable from the first token
    return Encoded("text", targets, ids=ids, pad_id=0)


def model(seed=0):
    torch.manual_seed(seed)
    return TransformerClassifier(3, vocab_size=1000, d_model=32, heads=2, layers=1, ff=64, dropout=0.0)


def test_compact_rows_train_to_the_same_weights_as_dense_adamw(monkeypatch):
    data = text_data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=5e-3, weight_decay=0.1, warmup_ratio=0.0, seed=0,
                      checkpoint_every=None, precision="fp32")
    compact = model()
    loop.fit(compact, data, None, cfg, regression=False, quiet=True)
    assert isinstance(compact.embed, torch.nn.Embedding)  # put back after training

    monkeypatch.setattr(loop, "compact_input_embedding", lambda *a, **k: None)
    dense = model()
    loop.fit(dense, data, None, cfg, regression=False, quiet=True)

    for (name, a), (_, b) in zip(dense.state_dict().items(), compact.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the rows no batch touched changed only by weight decay, and they did change
    untouched = dense.embed.weight[100:]
    assert not torch.equal(untouched, model().embed.weight[100:])


def test_compact_embedding_looks_up_like_the_original():
    m = model()
    emb = m.embed
    compact = UsedRowsEmbedding(emb, torch.tensor([1, 5, 7]))
    ids = torch.tensor([[1, 2, 5, 0, 7, 999]])
    torch.testing.assert_close(compact(ids), emb(ids))
    torch.testing.assert_close(compact.merged_weight(), emb.weight.detach())


def test_compact_rows_skipped_where_not_exact_or_not_worth_it():
    data = text_data()
    frozen = model()
    frozen.embed.weight.requires_grad_(False)
    assert compact_input_embedding(frozen, data.ids, "adamw", 0.01) is None
    # SGD's weight decay is a gradient on every row, so unused rows would not stay put
    assert compact_input_embedding(model(), data.ids, "sgd", 0.01) is None
    # most rows used: no gain
    assert compact_input_embedding(model(), [list(range(1, 900))], "adamw", 0.01) is None
    tied = model()
    tied.head = torch.nn.Linear(32, 1000)
    tied.head.weight = tied.embed.weight
    assert compact_input_embedding(tied, data.ids, "adamw", 0.01) is None
    handle = compact_input_embedding(model(), data.ids, "adamw", 0.01)
    assert handle is not None and len(handle.compact.row_ids) < 60


def test_evaluation_times_nothing(monkeypatch):
    """Prediction and LM evaluation pick their precision without a timing probe: a probe reads the machine's load, and
    a run's recorded metrics and a later `taoke eval` could then run in different precisions and disagree."""
    import taoke.train.precision as precision
    from taoke.lm.train import evaluate_lm
    from tests.lm_helpers import tiny_llama

    def no_probe(*args, **kwargs):
        raise AssertionError("evaluation must not time anything")

    monkeypatch.setattr(precision, "bf16_speedup", no_probe)
    monkeypatch.setattr(precision, "step_speedup", no_probe)
    class Classifier(torch.nn.Module):   # large enough (>= BF16_MIN_PARAMS) that training would probe it
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2048, 2560),
                                              torch.nn.Linear(2560, 3))

        def forward(self, pixel_values):
            return self.layers(pixel_values)

    classifier = Classifier()
    data = Encoded("image", torch.zeros(4, dtype=torch.long), dense=torch.randn(4, 1, 32, 64))
    ours = loop.predict(classifier, data)
    with torch.no_grad():
        assert torch.equal(ours, classifier(data.dense))   # fp32 on a CPU, as the model computes it alone
    lm = tiny_llama()
    rows = [{"input_ids": [1, 5, 7, 9], "labels": [1, 5, 7, 9]}]
    assert evaluate_lm(lm, rows, pad_id=0, seq_len=8)["tokens"] == 3


def test_precision_choice_follows_its_own_measurement():
    cpu = torch.device("cpu")
    big = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    assert sum(p.numel() for p in big.parameters()) >= BF16_MIN_PARAMS
    assert inference_dtype("fp32", cpu) is None
    assert inference_dtype("bf16", cpu) is torch.bfloat16
    assert inference_dtype("auto", cpu) is None   # evaluation never times anything: same numbers under any load
    small = choose_precision("auto", cpu, torch.nn.Linear(8, 8))
    choice = choose_precision("auto", cpu, big, tokens=256)
    if not cpu_has_bf16():   # emulated bf16 is never chosen, and nothing is timed
        assert small.dtype is None and choice.dtype is None and choice.measured is None
        assert "no native bf16" in choice.reason
        return
    assert small.dtype is None and "parameters" in small.reason  # too small to gain
    # the decision is the rule applied to the figure recorded beside it
    assert choice.measured["probe"] == "matmul 256x2048 @ 2048x2048"
    assert (choice.dtype is torch.bfloat16) == (choice.measured["speedup"] >= MIN_SPEEDUP)
    assert choice.record()["precision"] == ("bf16" if choice.dtype is torch.bfloat16 else "fp32")


def test_training_step_probe_leaves_the_run_as_if_nothing_was_measured():
    """choose_for_training times the loop's own step in both precisions; the random stream and the gradients
    are as they were before it (a dropout model draws random numbers in every step)."""
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(1536, 2048), torch.nn.Dropout(0.5), torch.nn.Linear(2048, 1536))
    assert sum(p.numel() for p in model.parameters()) >= BF16_MIN_PARAMS
    x = torch.randn(64, 1536)
    calls = []

    def loss():
        calls.append(torch.is_autocast_enabled("cpu"))
        return model(x).square().mean()

    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    choice = choose_for_training("auto", cpu, model, loss)
    assert torch.equal(torch.rand(4), expected)
    assert all(p.grad is None for p in model.parameters())
    if cpu_has_bf16():
        assert calls == [False, True] * 4   # a warm-up and three timed steps each, interleaved
        assert choice.measured["probe"] == "training step"
        assert (choice.dtype is torch.bfloat16) == (choice.measured["speedup"] >= MIN_SPEEDUP)
    else:
        assert calls == [] and choice.dtype is None


def test_onednn_isa_cap_below_bf16_means_fp32_and_is_recorded(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes torch emulate bf16 even on a bf16 CPU: fp32 is chosen without timing
    the emulation (it can be 100x slower), and the run's runtime record names the cap."""
    from taoke.hardware import runtime_record

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    big = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    choice = choose_precision("auto", torch.device("cpu"), big)
    assert not cpu_has_bf16() and choice.dtype is None and choice.measured is None
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in choice.reason
    rec = runtime_record(torch.device("cpu"))
    assert rec["kernels"] == {"aten": torch.backends.cpu.get_cpu_capability(), "onednn_isa_cap": "AVX2"}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")   # a cap above bf16 takes nothing away
    flags = open("/proc/cpuinfo").read()
    assert cpu_has_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_on_cuda_is_bf16_where_supported():
    dev = torch.device("cuda")
    assert inference_dtype("auto", dev) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)

"""The training speed-ups must not change what is learned: compact embedding rows and precision choice."""

import pytest
import torch

import taoke.train.classifier as loop
from taoke.models.scratch import TransformerClassifier
from taoke.recipe import TrainConfig
from taoke.train.batches import Encoded
from taoke.train.embedding_rows import UsedRowsEmbedding, compact_input_embedding
from taoke.train.precision import BF16_MIN_PARAMS, autocast_dtype, bf16_speedup


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


def test_precision_choice():
    cpu = torch.device("cpu")
    big = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
    assert sum(p.numel() for p in big.parameters()) >= BF16_MIN_PARAMS
    assert autocast_dtype("fp32", cpu, big) is None
    assert autocast_dtype("bf16", cpu, big) is torch.bfloat16
    assert autocast_dtype("auto", cpu, torch.nn.Linear(8, 8)) is None  # too small to gain
    chosen = autocast_dtype("auto", cpu, big, tokens=256)
    # auto follows the measured speed-up of this machine's matmuls
    if chosen is torch.bfloat16:
        assert bf16_speedup(256, 2048, 2048) >= 1.15
    assert bf16_speedup(16, 64, 64) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_on_cuda_is_bf16_where_supported():
    dev = torch.device("cuda")
    assert autocast_dtype("auto", dev) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)

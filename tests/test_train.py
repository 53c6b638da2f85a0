import pytest
import torch

from taoke.recipe import TrainConfig
from taoke.models.scratch import build_scratch
from taoke.train.batches import Encoded, batch_indices
from taoke.train.checkpoint import save_checkpoint
from taoke.train.classifier import fit, predict
from taoke.train.core import seed_everything


def digits_encoded(n=400):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return Encoded("image", torch.tensor(d.target[:n]), dense=x)


def test_fit_lowers_loss_and_beats_chance():
    data = digits_encoded()
    train = Encoded("image", data.targets[:300], dense=data.dense[:300])
    val = Encoded("image", data.targets[300:], dense=data.dense[300:])
    model = build_scratch("cnn", 10, {"in_channels": 1, "image_size": 8, "channels": (16, 32)})
    before = torch.nn.functional.cross_entropy(predict(model, val), val.targets).item()
    result = fit(model, train, val, TrainConfig(epochs=5, batch_size=32, lr=3e-3), regression=False, quiet=True)
    assert result.history[-1]["val_loss"] < before
    acc = (predict(model, val).argmax(-1) == val.targets).float().mean().item()
    assert acc > 0.5  # chance is 0.1


def test_fit_is_deterministic_with_seed():
    data = digits_encoded(200)
    runs = []
    for _ in range(2):
        seed_everything(3)
        model = build_scratch("mlp", 10, {"in_features": 64, "hidden": (32,)})
        fit(model, data, None, TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=3, precision="fp32"),
            regression=False, quiet=True)
        runs.append(predict(model, data))
    assert torch.equal(runs[0], runs[1])


def test_length_bucketing_groups_similar_lengths():
    ids = [[1] * n for n in torch.randint(1, 60, (400,)).tolist()]
    data = Encoded("text", torch.zeros(400, dtype=torch.long), ids=ids)
    batches = batch_indices(data, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(400))
    spread = sum(max(len(ids[i]) for i in b) - min(len(ids[i]) for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches would spread ~50 tokens
    batch = data.batch(batches[0])
    assert batch["input_ids"].shape[1] == max(len(ids[i]) for i in batches[0])


def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path):
    model = build_scratch("mlp", 2, {"in_features": 4, "hidden": (4,)})
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, model.state_dict(), opt, sched, {"step": 5})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["loop"]["step"] == 5


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    """Train 3 epochs straight; separately stop after a mid-epoch checkpoint and resume: same weights."""
    data = digits_encoded(300)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, checkpoint_every=4, precision="fp32", dropout=None)

    def model():
        seed_everything(0)
        return build_scratch("cnn", 10, {"in_channels": 1, "image_size": 8, "channels": (8, 16), "dropout": 0.3})

    straight = model()
    fit(straight, data, None, cfg, regression=False, quiet=True)

    class Stop(Exception):
        pass

    def stop_at(row):
        if row["step"] == 20:  # after the checkpoint at step 16 (mid epoch 2), before the next one
            raise Stop

    interrupted = model()
    with pytest.raises(Stop):
        fit(interrupted, data, None, cfg, regression=False, quiet=True, checkpoint_dir=tmp_path, on_step=stop_at)
    resumed = model()
    fit(resumed, data, None, cfg, regression=False, quiet=True, checkpoint_dir=tmp_path, resume=True)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("total,warmup_ratio", [(1, 0.0), (8, 0.1), (37, 0.25), (100, 0.0)])
def test_schedule_is_transformers_get_scheduler(kind, total, warmup_ratio):
    """make_scheduler writes transformers' formulas out (to keep peft out of a run's start): every step's learning
    rate must be exactly what transformers.get_scheduler gives."""
    from transformers import get_scheduler

    from taoke.train.core import make_scheduler

    def lrs(make) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = make(opt)
        out = []
        for _ in range(total + 2):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    cfg = TrainConfig(scheduler=kind, warmup_ratio=warmup_ratio)
    ours = lrs(lambda opt: make_scheduler(opt, cfg, total))
    theirs = lrs(lambda opt: get_scheduler(kind, opt, num_warmup_steps=int(warmup_ratio * total),
                                           num_training_steps=total))
    assert ours == theirs

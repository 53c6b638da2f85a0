"""train.distill: the teacher term against a hand computation, a student that really learns the teacher, and the
recipe rules (real digits from scikit-learn; a real MiniLM run for the end-to-end case)."""

import math

import pytest
import torch

from tests.conftest import read_json, run_cli
from tests.test_train import digits_encoded

from taoke.models.scratch import build_scratch
from taoke.recipe import Distill, TrainConfig
from taoke.train.classifier import fit, predict
from taoke.train.core import seed_everything
from taoke.train.distill import mixed_loss, teacher_loss


def test_teacher_term_against_hand_computation():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 2.5]])
    temp = 2.0
    by_hand = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / temp) for v in srow)
        zt = sum(math.exp(v / temp) for v in trow)
        ps = [math.exp(v / temp) / zs for v in srow]
        pt = [math.exp(v / temp) / zt for v in trow]
        by_hand += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    by_hand = by_hand / 2 * temp ** 2
    cfg = Distill(weight=0.25, temperature=temp)
    assert teacher_loss(s, t, False, cfg).item() == pytest.approx(by_hand, rel=1e-5)
    assert teacher_loss(t, t, False, cfg).item() == pytest.approx(0.0, abs=1e-6)
    assert teacher_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]]), True, cfg).item() == \
        pytest.approx((1 + 4) / 2)
    label = torch.tensor(1.5)
    assert mixed_loss(label, s, t, False, cfg).item() == pytest.approx(0.75 * 1.5 + 0.25 * by_hand, rel=1e-5)


def _kl_to(teacher_out, student_out):
    return torch.nn.functional.kl_div(student_out.log_softmax(-1), teacher_out.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def test_student_learns_the_teachers_outputs_not_only_the_labels():
    """A small MLP student of a briefly trained CNN teacher (soft, imperfect outputs): with weight 1 it ends much
    closer to the teacher (KL on held-out digits) than the same student trained on the labels alone."""
    data = digits_encoded(600)
    train = type(data)("image", data.targets[:400], dense=data.dense[:400])
    held = type(data)("image", data.targets[400:], dense=data.dense[400:])
    seed_everything(0)
    teacher = build_scratch("cnn", 10, {"in_channels": 1, "image_size": 8, "channels": (16, 32)})
    fit(teacher, train, None, TrainConfig(epochs=1, batch_size=32, lr=1e-3, precision="fp32"), regression=False,
        quiet=True)
    t_out = predict(teacher, held)
    kls = {}
    for name, distill in (("labels", None), ("teacher", Distill(weight=1.0, temperature=2.0))):
        seed_everything(1)
        student = build_scratch("mlp", 10, {"in_features": 64, "hidden": (32,)})
        cfg = TrainConfig(epochs=6, batch_size=32, lr=3e-3, seed=1, precision="fp32", distill=distill)
        fit(student, train, None, cfg, regression=False, quiet=True, teacher=teacher if distill else None)
        kls[name] = _kl_to(t_out, predict(student, held))
    assert kls["teacher"] < 0.5 * kls["labels"], kls
    assert all(not p.requires_grad for p in teacher.parameters())


def test_recipe_rules():
    from taoke.errors import RecipeError
    from taoke.recipe import recipe_from_dict as parse_recipe

    with pytest.raises(RecipeError, match="train.distill applies to classification"):
        parse_recipe({"name": "x", "base": "smollm2-135m", "task": "sft", "data": {"train": "a.jsonl"},
                      "train": {"distill": {"teacher": "base"}}})
    with pytest.raises(RecipeError, match="weight"):
        parse_recipe({"name": "x", "base": "minilm-l6", "task": "text-classification", "data": {"train": "a.csv"},
                      "train": {"distill": {"weight": 0}}})


@pytest.mark.slow
def test_pruned_minilm_healed_with_its_unpruned_teacher(tmp_path):
    """The prune edit's unpruned model teaches the pruned one (teacher: base); the run records it; a base without
    this task's head cannot teach."""
    teacher_run = tmp_path / "topics"
    fast = ["--set", "data.max_rows=260", "--set", "train.epochs=2", "--set", "train.early_stopping=null", "--quiet"]
    run_cli("derive", "recipes/text-topics.yaml", "--out", teacher_run, *fast)
    out = tmp_path / "pruned"
    run_cli("derive", "recipes/text-topics.yaml", "--out", out, "--set", f"base={teacher_run}",
            "--set", "edits=[{prune: {mlp: 0.3, heads: 0.25, by: activation}}]",
            "--set", "train.distill={teacher: base, weight: 0.5, temperature: 2.0}", *fast)
    lineage = read_json(out / "lineage.json")
    assert lineage["adaptation"]["distill"] == {"teacher": "base", "weight": 0.5, "temperature": 2.0}
    assert "distill" in (out / "recipe.yaml").read_text()
    proc = run_cli("derive", "recipes/text-topics.yaml", "--out", tmp_path / "no", "--set",
                   "train.distill={teacher: base}", *fast, check=False)
    assert proc.returncode == 2 and "needs a base that already predicts these labels" in " ".join(proc.stderr.split())
    assert not (tmp_path / "no").exists()

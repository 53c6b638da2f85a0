"""Knowledge distillation for classifiers and regressors: the loss that mixes the labels with a teacher's outputs.

Classification follows Hinton et al. (2015): KL(teacher || student) between the two softmaxes at temperature T,
scaled by T^2 so its gradients keep their size as T changes; regression matches the teacher's outputs by MSE.
Written here because it is three lines on top of torch's own kl_div; no library's trainer fits this loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taoke.recipe import Distill


def teacher_loss(outputs: torch.Tensor, teacher: torch.Tensor, regression: bool, cfg: Distill) -> torch.Tensor:
    """The teacher term alone (fp32)."""
    outputs, teacher = outputs.float(), teacher.float()
    if regression:
        return F.mse_loss(outputs.view(-1), teacher.view(-1))
    t = cfg.temperature
    return F.kl_div(F.log_softmax(outputs / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean") * t * t


def mixed_loss(label_loss: torch.Tensor, outputs: torch.Tensor, teacher: torch.Tensor, regression: bool,
               cfg: Distill) -> torch.Tensor:
    """(1 - weight) * the label loss + weight * the teacher term."""
    return (1.0 - cfg.weight) * label_loss + cfg.weight * teacher_loss(outputs, teacher, regression, cfg)

"""MD-IQA losses (eq. 3-6) and the lambda3 warm-up.

Printed in the paper: L_total = l1 L_sup + l2 L_pseudo + l3 L_consistency with l1 = 1,
l2 = 0.1, l3 warmed up so it passes l2 after ~400 iterations and approaches 1;
L_sup = L2 + beta KL with beta = 0.1; consistency is an L2 between student and EMA
teacher outputs.

Our choices (configurable in :class:`MDIQALossConfig`):

- ``l2_on="score"``: the L2 term compares the expected (soft) score with the label, one
  per scale, rather than the distribution vectors; it gives the regression a gradient of
  useful size and drives the soft read-out directly. ``"pdf"`` is the literal reading:
  sum over points of the squared difference of predicted and target distributions.
- KL(target || prediction) per scale, averaged over scales, summed over points.
- ``consistency_on="score"``: L2 between student and teacher per-scale expected scores;
  ``"pdf"`` compares the distributions.
- lambda3 follows the mean-teacher ramp l3(t) = l3_max * exp(-5 (1 - t/T)^2), T chosen so
  l3(400) = l2 = 0.1: T = 400 / (1 - sqrt(ln(l3_max / 0.1) / 5)) ~ 1245 for l3_max = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from qgate.models.mdiqa import MDIQAConfig, expected_scores, gaussian_targets

__all__ = [
    "LossParts",
    "MDIQALossConfig",
    "consistency_loss",
    "ensemble_pseudo_labels",
    "joint_loss",
    "lambda3_at",
    "pseudo_label_loss",
    "supervised_loss",
]


@dataclass(frozen=True)
class MDIQALossConfig:
    beta: float = 0.1  # paper
    lambda1: float = 1.0  # paper
    lambda2: float = 0.1  # paper
    lambda3_max: float = 1.0  # paper: "approaches 1"
    lambda3_cross_step: int = 400  # paper: l3 surpasses l2 after 400 iterations
    l2_on: Literal["score", "pdf"] = "score"
    consistency_on: Literal["score", "pdf"] = "score"

    def __post_init__(self) -> None:
        if self.lambda3_max <= self.lambda2:
            raise ValueError("lambda3_max must exceed lambda2 for the warm-up to cross it")
        if self.l2_on not in ("score", "pdf") or self.consistency_on not in ("score", "pdf"):
            raise ValueError("l2_on and consistency_on must be 'score' or 'pdf'")


class LossParts(NamedTuple):
    """A loss and its logged parts (all scalars; ``total`` carries the graph)."""

    total: torch.Tensor
    parts: dict[str, float]


def _targets(target: torch.Tensor, cfg: MDIQAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(target scores (B,), target distributions (B, K, P)) from scores or distributions."""
    if target.ndim == 1:
        dist = gaussian_targets(
            target, num_points=cfg.num_points, taus=cfg.taus, max_score=cfg.max_score
        )
        return target.float(), dist
    if target.ndim == 3:
        # Ensemble pseudo-labels may be whole distributions (mean of members' softmaxes).
        dist = target.float()
        j = torch.arange(dist.shape[-1], device=dist.device, dtype=torch.float32)
        score = ((dist * j).sum(-1) / (dist.shape[-1] - 1) * cfg.max_score).mean(-1)
        return score, dist
    raise ValueError(f"target must be (B,) scores or (B, K, P) distributions, got {target.shape}")


def supervised_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    cfg: MDIQAConfig,
    loss_cfg: MDIQALossConfig | None = None,
) -> LossParts:
    """Eq. 4: L2 + beta * KL(target || prediction), each averaged over the K scales.

    ``logits``: (B, K, N + 1) from the model; ``target``: (B,) scores in [0, M] or
    (B, K, N + 1) target distributions.
    """
    lc = loss_cfg or MDIQALossConfig()
    score, dist = _targets(target, cfg)
    logits = logits.float()
    logp = logits.log_softmax(-1)
    # KL per (sample, scale), summed over points; target zeros (far Gaussian tails
    # underflow) contribute 0 even where logp is -inf.
    cross = torch.where(dist > 0, dist * logp, torch.zeros_like(logp))
    kl = (torch.xlogy(dist, dist) - cross).sum(-1).mean()
    if lc.l2_on == "score":
        l2 = F.mse_loss(
            expected_scores(logits, cfg.max_score), score[:, None].expand(-1, logits.shape[1])
        )
    else:
        l2 = ((logp.exp() - dist) ** 2).sum(-1).mean()
    total = l2 + lc.beta * kl
    return LossParts(total, {"l2": float(l2.detach()), "kl": float(kl.detach())})


def pseudo_label_loss(
    logits: torch.Tensor,
    pseudo: torch.Tensor,
    cfg: MDIQAConfig,
    loss_cfg: MDIQALossConfig | None = None,
) -> LossParts:
    """Eq. 5: the supervised loss against ensemble pseudo-labels (scores or distributions)."""
    return supervised_loss(logits, pseudo, cfg, loss_cfg)


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    cfg: MDIQAConfig,
    loss_cfg: MDIQALossConfig | None = None,
) -> torch.Tensor:
    """Eq. 6: L2 between student and (detached) EMA-teacher outputs on the same images."""
    lc = loss_cfg or MDIQALossConfig()
    t = teacher_logits.detach().float()
    s = student_logits.float()
    if lc.consistency_on == "score":
        return F.mse_loss(expected_scores(s, cfg.max_score), expected_scores(t, cfg.max_score))
    return ((s.softmax(-1) - t.softmax(-1)) ** 2).sum(-1).mean()


def lambda3_at(step: int, loss_cfg: MDIQALossConfig | None = None) -> float:
    """The lambda3 warm-up: sigmoid-shaped ramp crossing lambda2 at ``lambda3_cross_step``."""
    lc = loss_cfg or MDIQALossConfig()
    ramp = lc.lambda3_cross_step / (1.0 - math.sqrt(math.log(lc.lambda3_max / lc.lambda2) / 5.0))
    phase = 1.0 - min(max(step, 0), ramp) / ramp
    return lc.lambda3_max * math.exp(-5.0 * phase * phase)


def joint_loss(
    *,
    labelled_logits: torch.Tensor,
    labels: torch.Tensor,
    unlabelled_logits: torch.Tensor,
    pseudo: torch.Tensor,
    teacher_logits: torch.Tensor,
    step: int,
    cfg: MDIQAConfig,
    loss_cfg: MDIQALossConfig | None = None,
) -> LossParts:
    """Eq. 3: l1 L_sup + l2 L_pseudo + l3(step) L_consistency (step 3 of the pipeline).

    ``teacher_logits`` are the EMA teacher's outputs on the unlabelled images.
    """
    lc = loss_cfg or MDIQALossConfig()
    sup = supervised_loss(labelled_logits, labels, cfg, lc)
    pse = pseudo_label_loss(unlabelled_logits, pseudo, cfg, lc)
    con = consistency_loss(unlabelled_logits, teacher_logits, cfg, lc)
    l3 = lambda3_at(step, lc)
    total = lc.lambda1 * sup.total + lc.lambda2 * pse.total + l3 * con
    return LossParts(
        total,
        {
            "sup": float(sup.total.detach()),
            "pseudo": float(pse.total.detach()),
            "consistency": float(con.detach()),
            "lambda3": l3,
        },
    )


def ensemble_pseudo_labels(
    member_logits: Sequence[torch.Tensor], max_score: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: average the members' distributions; return (scores (B,), dists (B, K, P)).

    Members must share N; if their K differ, each member's scales are averaged first.
    """
    if not member_logits:
        raise ValueError("need at least one ensemble member")
    probs = [m.float().softmax(-1) for m in member_logits]
    if len({p.shape[1] for p in probs}) > 1:
        probs = [p.mean(1, keepdim=True) for p in probs]
    dist = torch.stack(probs).mean(0)
    n = dist.shape[-1] - 1
    j = torch.arange(n + 1, device=dist.device, dtype=torch.float32)
    scores = ((dist * j).sum(-1) / n * max_score).mean(-1)
    return scores, dist

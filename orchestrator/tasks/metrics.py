"""Classification and correlation metrics in plain torch, matching scikit-learn / scipy.

GLUE scores each task with one or two of these (Wang et al. 2019; the `glue` metric of HF evaluate):

| task | metric(s) |
|---|---|
| CoLA | matthews_correlation |
| SST-2, MNLI, QNLI, RTE, WNLI | accuracy |
| MRPC, QQP | f1 (positive class 1) and accuracy |
| STS-B | pearson and spearmanr |

Arguments follow scikit-learn's order, (labels, preds), and accept lists, numpy arrays or tensors.
Conventions copied from scikit-learn so the numbers agree: F1 is 0 when undefined (no positive
predictions and no positive labels), macro F1 averages over the classes present in labels or
predictions, and MCC is 0 when a marginal is constant. The test suite compares against
scikit-learn / scipy on random inputs; neither is needed at run time.
"""

from __future__ import annotations

import math
from typing import Literal

import torch


def _flat(x, dtype=torch.long) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu().reshape(-1).to(dtype)


def _pair(labels, preds) -> tuple[torch.Tensor, torch.Tensor]:
    y, p = _flat(labels), _flat(preds)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.numel()}) and preds ({p.numel()}) differ in length")
    if y.numel() == 0:
        raise ValueError("no examples to score")
    return y, p


def confusion_matrix(labels, preds, num_classes: int | None = None) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    y, p = _pair(labels, preds)
    c = num_classes or int(max(y.max(), p.max())) + 1
    return torch.bincount(y * c + p, minlength=c * c).reshape(c, c)


def accuracy(labels, preds) -> float:
    y, p = _pair(labels, preds)
    return (y == p).double().mean().item()


def f1(labels, preds, average: Literal["binary", "macro"] = "binary", pos_label: int = 1) -> float:
    """Binary F1 of `pos_label`, or the unweighted mean of per-class F1 ("macro")."""
    y, p = _pair(labels, preds)

    def one(cls: int) -> float:
        tp = int(((p == cls) & (y == cls)).sum())
        fp = int(((p == cls) & (y != cls)).sum())
        fn = int(((p != cls) & (y == cls)).sum())
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0

    if average == "binary":
        return one(pos_label)
    if average == "macro":
        present = torch.unique(torch.cat([y, p])).tolist()
        return sum(one(c) for c in present) / len(present)
    raise ValueError(f"average={average!r}: expected 'binary' or 'macro'")


def matthews_corrcoef(labels, preds) -> float:
    """Matthews correlation (Gorodkin's multiclass form, as scikit-learn), in [-1, 1]."""
    cm = confusion_matrix(labels, preds).double()
    t, p = cm.sum(1), cm.sum(0)  # true / predicted counts per class
    n, correct = cm.sum(), cm.trace()
    cov_tp = correct * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return (cov_tp / torch.sqrt(cov_tt * cov_pp)).item()


def pearson(x, y) -> float:
    a, b = _flat(x, torch.float64), _flat(y, torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt((a @ a).item() * (b @ b).item())
    return (a @ b).item() / denom if denom else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties get their average rank (scipy.stats.rankdata's default)."""
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # average of ranks (end - count + 1) .. end
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(_flat(x, torch.float64)), _ranks(_flat(y, torch.float64)))


# name -> scorer(labels, preds) for the names tasks put in `metrics`.
CLASSIFICATION_METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": lambda labels, preds: f1(labels, preds, average="macro"),
    "matthews_correlation": matthews_corrcoef,
}

"""Classification and correlation metrics in plain torch, matching scikit-learn / scipy.

GLUE scores each task with one or two of these (Wang et al. 2019; the `glue` metric of HF evaluate):

| task | metric(s) |
|---|---|
| CoLA | matthews_correlation |
| SST-2, MNLI, QNLI, RTE, WNLI | accuracy |
| MRPC, QQP | f1 (positive class 1) and accuracy |
| STS-B | pearson and spearmanr |
| HumanEval (code generation) | pass@k: `pass_at_k`, `mean_pass_at_k` (Chen et al. 2021) |

Arguments follow scikit-learn's order, (labels, preds), and accept lists, numpy arrays or tensors.
Conventions copied from scikit-learn so the numbers agree: F1 is 0 when undefined (no positive
predictions and no positive labels), macro F1 averages over the classes present in labels or
predictions, and MCC is 0 when a marginal is constant. The test suite compares against
scikit-learn / scipy on random inputs; neither is needed at run time.

pass@k is plain Python: it takes counts of samples and of passing samples per problem, such as
`orchestrator.tasks.sandbox.run_many` gives when it runs HumanEval completions.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: n samples generated, c of them correct.

    The chance that at least one of k samples drawn without replacement from the n passes,
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    the HumanEval paper), computed in the paper's numerically stable form,
    1 - prod_{i=n-c+1..n} (1 - k/i), with no binomial coefficients (huge for n in the hundreds).
    """
    try:
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError:
        raise ValueError(f"pass_at_k(n={n!r}, c={c!r}, k={k!r}): counts must be integers") from None
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n and 1 <= k <= n")
    if n - c < k:  # every draw of k samples includes a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, from (n, c) per problem: the number HumanEval reports."""
    scores = [pass_at_k(n, c, k) for n, c in counts]
    if not scores:
        raise ValueError("mean_pass_at_k: no problems to average over")
    return sum(scores) / len(scores)


def per_group(name: str, groups: list[str], values: list, aggregate: Callable[[list], float] | None = None
              ) -> dict[str, float]:
    """{"name/<group>": aggregate within each group, "name": their unweighted mean}: the
    per-language breakdown, averaged over languages as multilingual benchmarks report it (a
    language with more eval examples does not weigh more). `aggregate` defaults to the mean."""
    if not values:
        raise ValueError(f"{name}: nothing to score")
    aggregate = aggregate or (lambda v: sum(v) / len(v))
    by = defaultdict(list)
    for group, value in zip(groups, values):
        by[group].append(value)
    out = {f"{name}/{group}": float(aggregate(v)) for group, v in sorted(by.items())}
    return {name: sum(out.values()) / len(out), **out}

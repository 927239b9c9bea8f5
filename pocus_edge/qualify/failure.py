"""Failure-detection and ranking metrics (the benchmark's and the ``selected`` view's).

* :func:`aurc`: area under the risk-coverage curve (Geifman et al.; Zenk et al. 2024): frames
  sorted by ascending risk score, at coverage k/N the selective risk is the mean failure (or
  loss) of the k lowest-risk frames; AURC is the mean of the selective risk over k = 1..N. Ties in
  the score are kept together (a tie group enters at once, the curve is evaluated at each group's
  end and weighted by the group's size), so the value does not depend on the input order.
* :func:`auroc`: probability that a failing frame scores higher than a good one (ties 1/2).
* :func:`spearman`: Spearman's rank correlation (average ranks for ties).
"""

from __future__ import annotations

import numpy as np

__all__ = ["aurc", "auroc", "spearman", "rankdata"]


def rankdata(x) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def aurc(score, loss) -> float:
    """Area under the risk-coverage curve of ``score`` (higher = riskier) for per-frame ``loss``
    (1 = failure, 0 = fine, or any loss in [0, 1]). Lower is better."""
    s = np.asarray(score, np.float64)
    loss = np.asarray(loss, np.float64)
    if s.size == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s, loss = s[order], loss[order]
    cum = np.cumsum(loss)
    n = len(s)
    # The end of each tie group: the curve is read only there.
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    starts = np.r_[0, ends[:-1] + 1]
    k = ends + 1
    sizes = ends - starts + 1
    return float(np.sum(sizes * cum[ends] / k) / n)


def auroc(score, failure) -> float:
    s = np.asarray(score, np.float64)
    f = np.asarray(failure).astype(bool)
    pos, neg = s[f], s[~f]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    r = rankdata(np.r_[pos, neg])
    return float((r[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))

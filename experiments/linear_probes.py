"""Linear probes: how much of the class a frozen representation holds, level by level.

Used by the toy study (``experiments/toy_study.py``) to find where a teacher's
knowledge is lost on its way into the Agglomerator: the teacher's own
embeddings, the student's regressed outputs (through the levels encoder), and
each level of the student's columns are probed the same way.

:func:`linear_probe` fits a multinomial logistic regression (features
standardised with train statistics; scikit-learn's ``LogisticRegression`` with
L-BFGS) for each weight decay of a small grid, picks the weight decay by
validation accuracy and reports the test accuracy of that choice: tuned on
validation, never on test.

The weight decay keeps its earlier meaning (the probe was first a hand-written
torch L-BFGS fit): the objective is the MEAN cross-entropy plus
``weight_decay * ||W||^2``, bias unpenalised. scikit-learn minimises
``C * sum CE + 0.5 * ||W||^2``, the same objective scaled, with
``C = 1 / (2 * weight_decay * N_train)``; with two classes it fits one weight
vector ``w = W_1 - W_0`` (``||W||^2 = ||w||^2 / 2`` at the optimum), so there
``C = 1 / (weight_decay * N_train)``. The parity test against the torch fit is
in ``experiments/tests/test_probe.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class ProbeResult:
    val_accuracy: float
    test_accuracy: float
    weight_decay: float


def _fit(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(F, classes)`` and bias ``(classes,)`` minimising mean CE + ``weight_decay * ||W||^2`` (bias unpenalised).

    A class absent from ``y`` gets zero weights and a ``-inf`` bias: never predicted.
    """
    seen = np.unique(y)
    binary = len(seen) == 2  # scikit-learn fits one weight vector w = W_1 - W_0, penalised 0.5 ||w||^2 = ||W||^2
    C = 1.0 / ((1 if binary else 2) * weight_decay * len(y))
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=steps, tol=1e-7).fit(x, y)
    coef, intercept = model.coef_.T, model.intercept_  # (F, classes seen) and (classes seen,), or (F, 1) and (1,)
    if binary:
        coef, intercept = np.concatenate([-coef, coef], 1) / 2, np.concatenate([-intercept, intercept]) / 2
    weight = np.zeros((x.shape[1], classes), dtype=x.dtype)
    bias = np.full(classes, -np.inf, dtype=x.dtype)
    weight[:, model.classes_], bias[model.classes_] = coef, intercept
    return weight, bias


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 weight_decays: Sequence[float] = WEIGHT_DECAYS, steps: int = 200) -> ProbeResult:
    """Fit on ``train``, choose the weight decay on ``val``, report ``test``. Each split: ``(features (N, F), labels (N,))``."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    standardise = lambda x: ((x - mean) / std).astype(np.float64)  # noqa: E731
    xtr, xva, xte = standardise(xtr), standardise(xva), standardise(xte)
    ytr = np.asarray(ytr, np.int64)
    classes = int(max(ytr.max(), yva.max(), yte.max())) + 1
    best = None
    for wd in weight_decays:
        weight, bias = _fit(xtr, ytr, classes, wd, steps)
        val_acc = float(((xva @ weight + bias).argmax(1) == yva).mean())
        if best is None or val_acc > best[0]:
            test_acc = float(((xte @ weight + bias).argmax(1) == yte).mean())
            best = (val_acc, test_acc, wd)
    return ProbeResult(*best)


@torch.no_grad()
def agglomerator_features(model: torch.nn.Module, batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Frozen features of an :class:`~partwhole.agglomerator.model.Agglomerator` over ``batches`` (eval transforms).

    Returns ``levels`` ``(N, n, l, d)`` (the columns' final levels), ``encoded_mean``
    ``(N, l, D)`` (the regressed outputs, mean over columns) and ``labels`` ``(N,)``.
    """
    model.eval()
    levels, encoded, labels = [], [], []
    for batch in batches:
        out = model(batch["image"])
        levels.append(out.levels.float().numpy())
        encoded.append(out.encoded.float().mean(1).numpy())
        labels.append(batch["label"].numpy())
    return {"levels": np.concatenate(levels), "encoded_mean": np.concatenate(encoded), "labels": np.concatenate(labels)}

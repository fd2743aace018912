"""Linear probes: how much of the class a frozen representation holds, level by level.

Used by the toy study (``experiments/toy_study.py``) to find where a teacher's
knowledge is lost on its way into the Agglomerator: the teacher's own
embeddings, the student's regressed outputs (through the levels encoder), and
each level of the student's columns are probed the same way.

:func:`linear_probe` fits a multinomial logistic regression (features
standardised with train statistics, full-batch L-BFGS) for each weight decay of
a small grid, picks the weight decay by validation accuracy and reports the
test accuracy of that choice: tuned on validation, never on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class ProbeResult:
    val_accuracy: float
    test_accuracy: float
    weight_decay: float


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 weight_decays: Sequence[float] = WEIGHT_DECAYS, steps: int = 200) -> ProbeResult:
    """Fit on ``train``, choose the weight decay on ``val``, report ``test``. Each split: ``(features (N, F), labels (N,))``."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    to_tensor = lambda x: torch.from_numpy(((x - mean) / std).astype(np.float64))  # noqa: E731
    xtr_t, xva_t, xte_t = to_tensor(xtr), to_tensor(xva), to_tensor(xte)
    ytr_t = torch.from_numpy(np.asarray(ytr, np.int64))
    classes = int(max(ytr.max(), yva.max(), yte.max())) + 1
    best = None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for wd in weight_decays:
            weight, bias = _fit(xtr_t, ytr_t, classes, wd, steps)
            val_acc = float(((xva_t @ weight + bias).argmax(1).numpy() == yva).mean())
            if best is None or val_acc > best[0]:
                test_acc = float(((xte_t @ weight + bias).argmax(1).numpy() == yte).mean())
                best = (val_acc, test_acc, wd)
    return ProbeResult(*best)


@torch.no_grad()
def agglomerator_features(model: torch.nn.Module, batches: Iterable[dict]) -> dict[str, np.ndarray]:
    """Frozen features of an :class:`~agglomerator.model.Agglomerator` over ``batches`` (eval transforms).

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

"""Mean ± std over seeds, as the toy study's and its recipe sweep's reports print them.

A module without flags, so that ``toy_study.py`` and ``toy_sweep.py`` (each with its own absl flags)
can both import it.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the finite values, None and nan left out; std 0 for one value, nan for none."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def format_mean_std(values: Iterable[float | None], scale: float = 100.0, digits: int = 1, lone_std: bool = True) -> str:
    """``"<mean> ± <std>"`` of ``scale`` times the finite values with ``digits`` decimals; ``"n/a"`` for none.

    ``lone_std=False`` writes a single value alone, without its ``± 0.0``.
    """
    values = [v for v in values if v is not None and np.isfinite(v)]
    mean, std = mean_std(values)
    if not values:
        return "n/a"
    if len(values) == 1 and not lone_std:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"

"""Drift of a stream of anomaly scores against the good images a run was calibrated on.

The statistic: of the last ``window`` scores, how many exceed ``ref``, the k-th smallest of the run's n
good-image calibration scores (k = ``conformal_rank(n, 1 - quantile)``: the good images' ``quantile``
quantile). While the product, camera and light are those of the calibration images, a good image's score is
exchangeable with theirs, and the count of a window of good images above ``ref`` follows a beta-binomial law
(a Polya urn: Beta(n + 1 - k, k) for the share of good images above ``ref``, binomial given it), which holds
exactly for any n, not only in the large-n limit. The check reports that count, its expected value
``window * (n + 1 - k) / (n + 1)``, and the one-sided tail probability of a count at least as large; below
``alpha`` the state is ``warning``. Defects raise the count too: a burst of real defects also shows, which on
a line deserves a look as well. The false-alarm rate of the running check, evaluated after every image, is
measured in tests/test_line.py.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy.stats import betabinom

from destseg.thresholds import conformal_rank, images_needed


class DriftMonitor:
    """Rolling drift check: ``add(score)`` for every scored image, ``state()`` for the report."""

    def __init__(self, calibration_scores, window: int = 200, quantile: float = 0.9, alpha: float = 1e-3):
        if window < 10:
            raise ValueError(f"drift window must be at least 10 images (got {window})")
        if not 0.5 <= quantile < 1:
            raise ValueError(f"drift quantile must be in [0.5, 1) (got {quantile})")
        if not 0 < alpha < 0.5:
            raise ValueError(f"drift alpha must be in (0, 0.5) (got {alpha})")
        s = np.sort(np.asarray(calibration_scores if calibration_scores is not None else [], np.float64).ravel())
        self.window, self.quantile, self.alpha = window, quantile, alpha
        self.n = len(s)
        self.k = conformal_rank(self.n, 1 - quantile)
        self.ref = float(s[self.k - 1]) if 0 < self.k <= self.n else None
        self.recent: deque[bool] = deque(maxlen=window)  # whether each recent score is above ref
        self.above = 0
        if self.ref is not None:  # the tail P(count >= c) for every c, once: state() is then O(1)
            self.a, self.b = self.n + 1 - self.k, self.k
            self.tail = betabinom.sf(np.arange(window + 1) - 1, window, self.a, self.b)

    def add(self, score: float) -> None:
        if len(self.recent) == self.window:
            self.above -= self.recent[0]
        flag = self.ref is not None and float(score) > self.ref
        self.recent.append(flag)
        self.above += flag

    def state(self) -> dict:
        """``state`` is ``unavailable`` (too few calibration images), ``warming up`` (window not full yet),
        ``ok`` or ``warning``; with the count above the reference, its expectation and the tail probability."""
        out = {"statistic": f"share of the last {self.window} scores above the good images' {self.quantile:.0%} "
                            "quantile (beta-binomial tail)",
               "window": self.window, "seen": len(self.recent), "alpha": self.alpha, "reference": self.ref}
        if self.ref is None:
            needed = images_needed(1 - self.quantile)
            return {**out, "state": "unavailable",
                    "reason": f"{self.n} good calibration scores; the {self.quantile:.0%} quantile needs {needed}"}
        expected = self.a / (self.a + self.b)
        if len(self.recent) < self.window:
            return {**out, "state": "warming up", "expected_share": expected}
        p = float(self.tail[self.above])
        return {**out, "state": "warning" if p < self.alpha else "ok", "above": self.above,
                "share": self.above / self.window, "expected_share": expected, "p_value": p}

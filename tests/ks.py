"""Two-sample Kolmogorov-Smirnov test (asymptotic p-value, Numerical Recipes' form), so the
suite needs no scipy."""
import numpy as np


def ks_2samp_pvalue(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    d = np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)))
    en = np.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    j = np.arange(1, 101)
    p = 2 * np.sum((-1.0) ** (j - 1) * np.exp(-2 * j ** 2 * lam ** 2))
    return float(np.clip(p, 0.0, 1.0))

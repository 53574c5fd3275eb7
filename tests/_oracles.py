"""Independent NumPy references shared by several test modules (loops, not the library's vectorised code)."""

import numpy as np


def np_mask(w, n=2, m=4, allowed=None):
    """Loop reference: keep the n largest |w| of each group of m rows (stable sort: lower index wins ties),
    choosing only among the ``allowed`` entries when given."""
    out = np.zeros(w.shape, bool)
    allowed = np.ones(w.shape, bool) if allowed is None else allowed
    for c in range(w.shape[1]):
        for g in range(0, w.shape[0], m):
            order = [i for i in np.argsort(-np.abs(w[g : g + m, c]), kind="stable") if allowed[g + i, c]]
            out[g + np.asarray(order[:n], int), c] = True
    return out

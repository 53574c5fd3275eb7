"""Synthetic implicit feedback with a known ground truth, for judging uncertainty estimators.

Generative model (all draws from one NumPy generator seeded by ``config.seed``):

- true factors ``a_u ~ N(0, I_d)``, ``b_i ~ N(0, I_d)``, item popularity ``c_i ~ N(0, pop_std^2)``;
  true preference ``r_ui = <a_u, b_i> / sqrt(d) + c_i``;
- user activity ``n_u = clip(round(exp(N(log activity_median, activity_sigma^2))), min, max)`` (log-normal,
  heavy-tailed);
- the user's ``n_u`` interactions are drawn without replacement with probabilities ``∝ exp(r_ui /
temperature)``
  (Gumbel top-``n_u``), so observed items follow the true preference;
- ``test_fraction`` of each user's interactions (at least one, at most ``n_u - 1``) are held out at random.

The true-preference ground truth for a user is the ``true_top`` candidates (items not in training) with the
highest ``r_ui``: "true top-20" NDCG measures how well a list recovers the user's real taste, without the
held-out-count confound of a random split (see ``docs/results-lidu-synthetic.md``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lidu_jax.types import InteractionSplit

__all__ = ["SyntheticConfig", "SyntheticData", "generate", "true_top_relevance"]


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Ground-truth generator settings (defaults: the setting of ``docs/results-lidu-synthetic.md``)."""

    n_users: int = 600
    n_items: int = 400
    dim: int = 8
    pop_std: float = 0.5
    activity_median: float = 20.0
    activity_sigma: float = 0.8
    min_activity: int = 6
    max_activity: int = 150
    temperature: float = 0.5
    test_fraction: float = 0.2
    true_top: int = 20
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """A generated data set.

    Attributes:
      split: train / test `InteractionSplit`.
      true_scores: ``(n_users, n_items)`` float32 true preferences ``r_ui``.
      true_relevant: ``(n_users, n_items)`` bool, the true top-``true_top`` items among each user's
      candidates.
      activity: ``(n_users,)`` int number of interactions drawn per user (train + test).
    """

    split: InteractionSplit
    true_scores: np.ndarray
    true_relevant: np.ndarray
    activity: np.ndarray


def _check(config: SyntheticConfig) -> None:
    c = config
    if c.n_users < 2 or c.n_items < 2 or c.dim < 1:
        raise ValueError(f"config: need n_users, n_items >= 2 and dim >= 1, got {c}")
    if not 2 <= c.min_activity <= c.max_activity:
        raise ValueError(
            f"config: need 2 <= min_activity <= max_activity, got {c.min_activity}, {c.max_activity}"
        )
    if c.max_activity + c.true_top > c.n_items:
        raise ValueError(f"config: max_activity + true_top must be <= n_items={c.n_items}")
    if not 0.0 < c.test_fraction < 1.0 or c.temperature <= 0 or c.activity_median <= 0 or c.true_top < 1:
        raise ValueError(f"config: need 0 < test_fraction < 1, temperature > 0, activity_median > 0, got {c}")


def true_top_relevance(true_scores: np.ndarray, candidates: np.ndarray, top: int) -> np.ndarray:
    """Bool ``(U, I)``: for each user, the ``top`` highest ``true_scores`` among the ``candidates`` (True =
    may be recommended, the mask convention of every lidu_jax function)."""
    masked = np.where(candidates, true_scores, -np.inf)
    idx = np.argpartition(-masked, top - 1, axis=1)[:, :top]
    rel = np.zeros(true_scores.shape, bool)
    np.put_along_axis(rel, idx, True, axis=1)
    return rel & candidates


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Draw one synthetic data set (see the module docstring for the model)."""
    _check(config)
    c = config
    rng = np.random.default_rng(c.seed)
    a = rng.standard_normal((c.n_users, c.dim))
    b = rng.standard_normal((c.n_items, c.dim))
    pop = c.pop_std * rng.standard_normal(c.n_items)
    true_scores = (a @ b.T / np.sqrt(c.dim) + pop[None, :]).astype(np.float32)
    activity = np.exp(np.log(c.activity_median) + c.activity_sigma * rng.standard_normal(c.n_users))
    activity = np.clip(np.round(activity), c.min_activity, c.max_activity).astype(np.int64)
    # Gumbel top-n_u draws n_u items without replacement with probability ∝ exp(r / temperature).
    keys = true_scores / c.temperature + rng.gumbel(size=true_scores.shape)
    order = np.argsort(-keys, axis=1)
    tr_u, tr_i, te_u, te_i = [], [], [], []
    for u in range(c.n_users):
        items = order[u, : activity[u]]
        n_test = int(np.clip(round(c.test_fraction * activity[u]), 1, activity[u] - 1))
        held = rng.permutation(activity[u])[:n_test]
        is_test = np.zeros(activity[u], bool)
        is_test[held] = True
        tr_u.append(np.full((~is_test).sum(), u))
        tr_i.append(items[~is_test])
        te_u.append(np.full(n_test, u))
        te_i.append(items[is_test])
    split = InteractionSplit(
        n_users=c.n_users,
        n_items=c.n_items,
        train_users=np.concatenate(tr_u).astype(np.int32),
        train_items=np.concatenate(tr_i).astype(np.int32),
        test_users=np.concatenate(te_u).astype(np.int32),
        test_items=np.concatenate(te_i).astype(np.int32),
        name="synthetic",
    )
    relevant = true_top_relevance(true_scores, ~split.train_matrix(), c.true_top)
    return SyntheticData(split, true_scores, relevant, activity)

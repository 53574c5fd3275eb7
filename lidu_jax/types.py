"""Plain data containers shared by every `lidu_jax` module (data -> model -> scores -> estimator)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np


class LiduResult(NamedTuple):
    """What `lidu`, `lidu_chunked`, `lidu_sharded` and `lidu_from_samples` return: a tuple, so
    ``values, rankings = lidu(...)`` works, and a pytree, so it passes through `jax.jit`.

    Attributes:
      values: ``(...)`` float32 ``LiDu_u = -log P_u(L_u)`` (or ``-log P / K`` per position); higher = more
        uncertain.
      rankings: ``(..., K)`` int32, each user's list ``L_u`` (top-K candidates by mean), rank 1 first.
    """

    values: jax.Array
    rankings: jax.Array


@dataclasses.dataclass(frozen=True)
class InteractionSplit:
    """Implicit-feedback interactions split into train and test, with dense integer ids.

    Attributes:
      n_users, n_items: catalogue sizes; user ids are ``0..n_users-1``, item ids ``0..n_items-1``.
      train_users, train_items: ``(n_train,)`` int32, one row per training interaction.
      test_users, test_items: ``(n_test,)`` int32, one row per held-out interaction.
      train_sequences: optional per-user training item sequences in time order (for sequential
        models); ``None`` when the data has no order.
      name: a short label for tables and plots.
    """

    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    train_sequences: tuple[np.ndarray, ...] | None = None
    name: str = "data"

    def train_matrix(self) -> np.ndarray:
        """Bool ``(n_users, n_items)``: True where (u, i) is a training interaction."""
        m = np.zeros((self.n_users, self.n_items), dtype=bool)
        m[self.train_users, self.train_items] = True
        return m

    def test_matrix(self) -> np.ndarray:
        """Bool ``(n_users, n_items)``: True where (u, i) is a held-out interaction."""
        m = np.zeros((self.n_users, self.n_items), dtype=bool)
        m[self.test_users, self.test_items] = True
        return m

    def user_activity(self) -> np.ndarray:
        """``(n_users,)`` int: number of training interactions per user."""
        return np.bincount(self.train_users, minlength=self.n_users)

    def item_popularity(self) -> np.ndarray:
        """``(n_items,)`` int: number of training interactions per item."""
        return np.bincount(self.train_items, minlength=self.n_items)

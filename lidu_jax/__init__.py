"""LiDu: List Distribution uncertainty for recommender systems, in JAX.

``LiDu_u = -log Pr[S_{l1} > ... > S_{lK} > max_{j in C_u \\ L} S_j]`` for a user's top-K list under
independent item score distributions (a reconstruction of arXiv 2507.23208 from its abstract; see
``docs/maths-lidu.md``).

Data flows one way: data (`lidu_jax.synthetic`, `lidu_jax.types`) -> models (`lidu_jax.models`, trained with
`lidu_jax.training`) -> score distributions (`lidu_jax.distributions`) -> estimators (`lidu_jax.estimators`,
`lidu_jax.samples`, `lidu_jax.sharding`, `lidu_jax.baselines`) -> metrics and evaluation (`lidu_jax.metrics`,
`lidu_jax.evaluation`).

The estimators' layout: `lidu_jax.estimators` / `lidu_jax.samples` / `lidu_jax.sharding` are what users call
(checks in `lidu_jax.validation`, each user's frame in `lidu_jax.standardise`); `lidu_jax.reference` is the
maths, one function per estimator; `lidu_jax.backend` chooses between it and the CPU fast path of
`lidu_jax.cpu_backend` from where the arrays live.
"""

from lidu_jax import baselines, metrics
from lidu_jax.agreement import list_self_agreement
from lidu_jax.correlated import lidu_correlated
from lidu_jax.estimators import (
    checked_lidu,
    checked_list_log_prob,
    lidu,
    lidu_chunked,
    list_log_prob,
    top_k_rankings,
)
from lidu_jax.samples import lidu_from_samples, list_log_prob_from_samples, sample_moments
from lidu_jax.sharding import lidu_sharded
from lidu_jax.types import InteractionSplit, LiduResult

__all__ = [
    "InteractionSplit",
    "LiduResult",
    "baselines",
    "checked_lidu",
    "checked_list_log_prob",
    "lidu",
    "lidu_chunked",
    "lidu_correlated",
    "lidu_from_samples",
    "lidu_sharded",
    "list_log_prob",
    "list_log_prob_from_samples",
    "list_self_agreement",
    "metrics",
    "sample_moments",
    "top_k_rankings",
]

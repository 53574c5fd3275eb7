"""Interaction-file readers, implicit conversion, k-core, splits and the named real datasets."""

from __future__ import annotations

import collections
import importlib.util
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lidu_jax import datasets as D

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "recsys"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------- reading


def test_recbole_header_table(tmp_path):
    p = _write(
        tmp_path,
        "x.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n10\t7\t4\t300\n10\t8\t2\t100\n11\t7\t5\t50\n",
    )
    d = D.read_interactions(p)
    np.testing.assert_array_equal(d.users, [10, 10, 11])
    np.testing.assert_array_equal(d.items, [7, 8, 7])
    np.testing.assert_array_equal(d.ratings, [4, 2, 5])
    np.testing.assert_array_equal(d.timestamps, [300, 100, 50])


def test_header_columns_taken_by_name(tmp_path):
    # Columns in a different order than user,item,rating,timestamp: the header decides.
    p = _write(tmp_path, "r.csv", "timestamp,movieId,userId,rating\n5,100,1,3.5\n6,101,2,4.0\n")
    d = D.read_interactions(p)
    np.testing.assert_array_equal(d.users, [1, 2])
    np.testing.assert_array_equal(d.items, [100, 101])
    np.testing.assert_array_equal(d.ratings, [3.5, 4.0])
    np.testing.assert_array_equal(d.timestamps, [5, 6])


def test_whitespace_table_without_header_like_u_data(tmp_path):
    p = _write(tmp_path, "u.data", "1 2 3 99\n1 3 5 98\n2 2 1 97\n")
    d = D.read_interactions(p)
    assert d.ratings is not None and d.timestamps is not None
    np.testing.assert_array_equal(d.items, [2, 3, 2])


def test_two_column_table_has_no_ratings_or_times(tmp_path):
    d = D.read_interactions(_write(tmp_path, "pairs.tsv", "1\t2\n1\t3\n"))
    assert d.ratings is None and d.timestamps is None and len(d) == 2


def test_sequence_format(tmp_path):
    p = _write(tmp_path, "seq.txt", "1 5 6 7 8 9\n2 6 5\n3 9 8 7 6 5 4\n")
    d = D.read_interactions(p)
    np.testing.assert_array_equal(d.users, [1] * 5 + [2] * 2 + [3] * 6)
    np.testing.assert_array_equal(d.items, [5, 6, 7, 8, 9, 6, 5, 9, 8, 7, 6, 5, 4])
    np.testing.assert_array_equal(d.timestamps, [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5])
    # A sequence file where every user has the same number of items is ambiguous: fmt forces it.
    q = _write(tmp_path, "seq2.txt", "1 5 6\n2 6 5\n")
    assert D.read_interactions(q, fmt="sequence").timestamps is not None
    assert D.read_interactions(q).ratings is not None  # auto: 3 equal columns read as a table


@pytest.mark.parametrize(
    "name, text, fmt, match",
    [
        ("cols.tsv", "1\t2\t3\n1\t2\n", "auto", r"cols.tsv:2: expected 3 columns, got 2"),
        ("ids.tsv", "1\t2\nalice\t3\n", "auto", r"ids.tsv:2: user id 'alice' is not an integer"),
        ("item.tsv", "1\t2\n1\tx7\n", "auto", r"item.tsv:2: item id 'x7' is not an integer"),
        ("rate.tsv", "1\t2\t4\n1\t3\tgood\n", "auto", r"rate.tsv:2: rating 'good' is not a number"),
        ("nan.tsv", "1\t2\t4\n1\t3\tnan\n", "auto", r"nan.tsv:2: rating 'nan' is not finite"),
        ("empty_user.txt", "1 5 6 7\n2\n3 4 5 6 7\n", "sequence", r"empty_user.txt:2: user 2 has no items"),
        ("dup_user.txt", "1 5 6 7\n1 4 5 6 7\n", "sequence", r"dup_user.txt:2: user 1 appears on more"),
        ("seq_ids.txt", "1 5 6 7 8\n2 5 b 7\n", "auto", r"seq_ids.txt:2: item id 'b'"),
        ("hdr.csv", "foo,bar\n1,2\n", "auto", r"hdr.csv:1: header .* no recognisable user and item"),
        ("blank.tsv", "\n\n", "auto", r"blank.tsv: file has no interactions"),
        ("wide.tsv", "1\t2\t3\t4\t5\n", "table", r"wide.tsv:1: a table needs 2-4 columns"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, fmt, match):
    with pytest.raises(ValueError, match=match):
        D.read_interactions(_write(tmp_path, name, text), fmt=fmt)


BAD_FILES = [
    # Bytes that are not UTF-8 text: a Latin-1 export, a binary file.
    ("latin1.tsv", b"1\t2\t5\t100\n\xe9\t3\t4\t101\n", r":2: not UTF-8 text \(byte 0xe9 at column 1\)"),
    ("binary.dat", b"1 2 3 4\n" + bytes(range(256)), r":2: NUL byte at column 1"),
    ("nul.tsv", b"user\titem\n\x00\x01\x02\x03\n", r":2: NUL byte at column 1 in b'\\x00\\x01\\x02\\x03'"),
    ("late.txt", b"1 5 6 7 8\n" * 3 + b"4 5 \xff\xfe 7\n", r":4: not UTF-8 .* in b'4 5 \\xff\\xfe 7'"),
    # Ids that do not fit in int64 (a 23-digit id), in a table and in a sequence file.
    ("big.tsv", b"1\t2\n12345678901234567890123\t3\n", r":2: user id '12345678901234567890123' does not fit"),
    ("bigseq.txt", b"1 5 6 7 8\n2 5 99999999999999999999999 7\n", r":2: item id '9{23}' does not fit"),
    ("neg.tsv", b"1\t2\n-9223372036854775809\t3\n", r":2: user id '-9223372036854775809' does not fit"),
    # nan / empty ids and bad values on the first line: data, not an unrecognisable header.
    ("nan_first.tsv", b"nan\t3\t4\t101\n1\t2\t5\t100\n", r":1: user id 'nan' is not an integer id"),
    ("nan_seq.txt", b"nan 5 6 7 8\n2 5 6 7\n", r":1: user id 'nan' is not an integer id"),
    ("empty_first.tsv", b"\t3\t4\t101\n1\t2\t5\t100\n", r":1: user id is empty"),
    ("empty_id.tsv", b"1\t2\n\t3\n", r":2: user id is empty"),
    ("rating_first.tsv", b"1\t2\tfive\t100\n", r":1: rating 'five' is not a number"),
    ("time_first.tsv", b"1\t2\t5\tnan\n", r":1: timestamp 'nan' is not finite"),
    # A row shorter than the header: the count the header asks for, and the row itself.
    ("short.inter", b"user_id:token\titem_id:token\n1\n", r":2: expected 2 columns, got 1: '1'"),
    # Line numbers count blank lines and CRLF ends like an editor does.
    ("crlf.tsv", b"1\t2\r\n\r\n3\tx\r\n", r":3: item id 'x' is not an integer id"),
]


@pytest.mark.parametrize("name, content, match", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_bytes_ids_and_values_name_file_line_and_value(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(name) + match) as exc:
        D.read_interactions(p)
    assert type(exc.value) is ValueError  # not a UnicodeDecodeError / OverflowError passing for one
    assert len(str(exc.value)) < 400  # an excerpt of the line, not the line


def test_a_huge_bad_line_is_shown_as_an_excerpt(tmp_path):
    p = tmp_path / "huge.tsv"
    p.write_bytes(b"1\t2\n" + b"7" * 100_000 + b"\t3\n")
    with pytest.raises(ValueError, match=r"huge.tsv:2: user id '7{40}'\.\.\. does not fit") as exc:
        D.read_interactions(p)
    assert len(str(exc.value)) < 400


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    p = tmp_path / "bom.inter"
    p.write_bytes(b"\xef\xbb\xbfuser_id:token\titem_id:token\n10\t7\n11\t8\n")
    d = D.read_interactions(p)
    np.testing.assert_array_equal(d.users, [10, 11])


def test_to_implicit_keeps_distinct_pairs_with_negative_or_huge_ids():
    # Raw ids are only labels: pairs must not be merged because user * (max_item + 1) + item collides
    # (a negative item) or wraps around int64 (4 * 2**62 == 0 mod 2**64).
    neg = D.Interactions(np.array([0, 1]), np.array([5, -1]))
    assert len(D.to_implicit(neg)) == 2
    huge = D.Interactions(np.array([0, 4, 0]), np.array([0, 0, 2**62 - 1]))
    assert len(D.to_implicit(huge)) == 3
    dup = D.Interactions(np.array([-3, -3, 2**62]), np.array([-7, -7, 2**62]))
    assert len(D.to_implicit(dup)) == 2  # the repeated pair still collapses


def test_missing_file_and_bad_args(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        D.read_interactions(tmp_path / "nope.tsv")
    p = _write(tmp_path, "a.tsv", "1\t2\n")
    with pytest.raises(ValueError, match="fmt"):
        D.read_interactions(p, fmt="parquet")
    with pytest.raises(ValueError, match="min_rating"):
        D.to_implicit(D.read_interactions(p), min_rating=4)
    with pytest.raises(ValueError, match="no timestamps"):
        D.split_leave_last_out(D.read_interactions(_write(tmp_path, "b.tsv", "1\t2\n1\t3\n")))
    with pytest.raises(ValueError, match="split"):
        D.split_interactions(D.read_interactions(p), "temporal")
    with pytest.raises(ValueError, match="test_fraction"):
        D.split_random(D.read_interactions(p), test_fraction=1.0)


# ---------------------------------------------------------------------------------------- transforms


def test_to_implicit_threshold_and_dedup(tmp_path):
    # (1, 2) rated twice: the earlier event (t=1) survives; rating 2 is dropped at threshold 3.
    p = _write(tmp_path, "r.tsv", "1\t2\t5\t9\n1\t2\t4\t1\n1\t3\t2\t5\n2\t3\t3\t7\n")
    d = D.to_implicit(D.read_interactions(p), min_rating=3)
    got = sorted(zip(d.users.tolist(), d.items.tolist(), d.timestamps.tolist(), strict=True))
    assert got == [(1, 2, 1.0), (2, 3, 7.0)]


def _naive_k_core(pairs: list[tuple[int, int]], k_user: int, k_item: int) -> set[tuple[int, int]]:
    """Independent reference: repeatedly delete one offending pair-set with Counters until none is left."""
    cur = set(pairs)
    while True:
        cu = collections.Counter(u for u, _ in cur)
        ci = collections.Counter(i for _, i in cur)
        nxt = {(u, i) for u, i in cur if cu[u] >= k_user and ci[i] >= k_item}
        if nxt == cur:
            return cur
        cur = nxt


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 12), st.integers(0, 9)), min_size=1, max_size=80, unique=True),
    st.integers(1, 4),
    st.integers(1, 4),
)
def test_k_core_matches_naive(pairs, k_user, k_item):
    data = D.Interactions(np.array([u for u, _ in pairs]), np.array([i for _, i in pairs]))
    expected = _naive_k_core(pairs, k_user, k_item)
    if not expected:
        with pytest.raises(ValueError, match="removed every interaction"):
            D.k_core(data, k_user, k_item)
        return
    out = D.k_core(data, k_user, k_item)
    assert set(zip(out.users.tolist(), out.items.tolist(), strict=True)) == expected


# -------------------------------------------------------------------------------------------- splits


def _random_data(rng: np.random.Generator, n_users=30, n_items=40, with_time=True) -> D.Interactions:
    rows = []
    for u in range(n_users):
        k = rng.integers(2, 15)
        for i in rng.choice(n_items, k, replace=False):
            rows.append((u * 3 + 100, i * 7 + 5, rng.integers(0, 10**6)))  # sparse, non-dense raw ids
    a = np.array(rows)
    return D.Interactions(a[:, 0], a[:, 1], None, a[:, 2].astype(float) if with_time else None, "rand")


def test_leave_last_out_holds_out_the_latest_item_per_user():
    rng = np.random.default_rng(0)
    data = _random_data(rng)
    s = D.split_leave_last_out(data)
    uids, iids = np.unique(data.users), np.unique(data.items)
    assert (s.n_users, s.n_items) == (uids.size, iids.size)
    # Independent reference: for each raw user, the item with the largest timestamp.
    for u_raw in uids:
        rows = np.flatnonzero(data.users == u_raw)
        last = data.items[rows[np.argmax(data.timestamps[rows])]]
        u = np.searchsorted(uids, u_raw)
        assert s.test_items[s.test_users == u].tolist() == [np.searchsorted(iids, last)]
        # Training sequence: the other items sorted by time.
        others = rows[np.argsort(data.timestamps[rows])][:-1]
        np.testing.assert_array_equal(s.train_sequences[u], np.searchsorted(iids, data.items[others]))
    assert len(s.train_users) + len(s.test_users) == len(data)
    assert not (s.train_matrix() & s.test_matrix()).any()


def test_random_split_is_deterministic_and_per_user():
    data = _random_data(np.random.default_rng(1), with_time=False)
    a = D.split_random(data, test_fraction=0.25, seed=3)
    b = D.split_random(data, test_fraction=0.25, seed=3)
    c = D.split_random(data, test_fraction=0.25, seed=4)
    np.testing.assert_array_equal(a.test_items, b.test_items)
    assert not np.array_equal(a.test_matrix(), c.test_matrix())
    counts = np.bincount(np.searchsorted(np.unique(data.users), data.users))
    n_test = np.bincount(a.test_users, minlength=a.n_users)
    np.testing.assert_array_equal(n_test, np.clip(np.rint(0.25 * counts), 1, counts - 1))
    assert (a.user_activity() >= 1).all() and a.train_sequences is None
    assert (a.train_matrix() | a.test_matrix()).sum() == len(data)


def test_load_interactions_pipeline(tmp_path):
    lines = [f"{u} " + " ".join(str(10 + (u * 5 + t) % 9) for t in range(6)) for u in range(1, 9)]
    p = _write(tmp_path, "tiny.txt", "\n".join(lines) + "\n")
    s = D.load_interactions(p, D.LoadConfig(k_user=2, k_item=2), name="tiny")
    assert s.name == "tiny" and s.train_sequences is not None
    assert np.bincount(s.test_users).tolist() == [1] * s.n_users
    sub = D.load_interactions(p, D.LoadConfig(k_user=0, k_item=0, max_users=3, split="random"))
    assert sub.n_users == 3


# -------------------------------------------------------------------------------------- named sets

HAS_RECBOLE = importlib.util.find_spec("recbole") is not None


@pytest.mark.skipif(not HAS_RECBOLE, reason="recbole wheel (ships ml-100k.inter) not installed")
def test_movielens_100k_from_recbole_wheel():
    path = D.movielens_100k_path()
    raw = D.read_interactions(path)
    assert len(raw) == 100_000 and np.unique(raw.users).size == 943 and np.unique(raw.items).size == 1682
    s = D.movielens_100k(config=D.LoadConfig(k_user=0, k_item=0))
    assert (s.n_users, s.n_items) == (943, 1682) and len(s.test_users) == 943
    assert len(s.train_users) + len(s.test_users) == 100_000
    pos = D.movielens_100k(config=D.LoadConfig(min_rating=4, k_user=0, k_item=0))
    assert len(pos.train_users) + len(pos.test_users) == int((raw.ratings >= 4).sum())


def test_movielens_path_env_and_url_cache(tmp_path, monkeypatch):
    data = "1\t10\t5\t881250949\n1\t11\t3\t881250950\n2\t10\t4\t881250951\n2\t12\t4\t881250952\n"
    local = _write(tmp_path, "u.data", data)
    monkeypatch.setenv(D.ML100K_ENV, str(local))
    assert D.movielens_100k_path() == local
    monkeypatch.delenv(D.ML100K_ENV)
    with pytest.raises(ValueError, match="does not exist"):
        D.movielens_100k_path(tmp_path / "missing.inter")
    # The download path, exercised offline with a file:// URL to a zip shaped like GroupLens'.
    zpath = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ml-100k/u.data", data)
    monkeypatch.setattr(D, "_recbole_ml100k", lambda: None)
    got = D.movielens_100k_path(url=zpath.as_uri(), cache_dir=tmp_path / "cache")
    assert got.read_text() == data and got.parent == tmp_path / "cache"
    zpath.unlink()  # second call must be served from the cache
    assert D.movielens_100k_path(url=zpath.as_uri(), cache_dir=tmp_path / "cache") == got
    s = D.movielens_100k(
        url=zpath.as_uri(), cache_dir=tmp_path / "cache", config=D.LoadConfig(k_user=0, k_item=0)
    )
    assert s.test_items.tolist() == [1, 2]  # raw items 11 and 12 are the latest of users 1 and 2
    with pytest.raises(ValueError, match="MovieLens-100K not found"):
        D.movielens_100k_path()


@pytest.mark.skipif(
    not (SHARED / "Beauty.txt").is_file(), reason="../shared/data/recsys absent (user machine)"
)
@pytest.mark.parametrize(
    "loader, fname, n_users, n_items, n_inter",
    [(D.beauty, "Beauty.txt", 22_363, 12_101, 198_502), (D.lastfm, "LastFM.txt", 1_090, 3_646, 52_551)],
)
def test_shared_recsys_files(loader, fname, n_users, n_items, n_inter, monkeypatch):
    raw = D.read_interactions(SHARED / fname)
    assert (np.unique(raw.users).size, np.unique(raw.items).size, len(raw)) == (n_users, n_items, n_inter)
    monkeypatch.setenv(D.RECSYS_DIR_ENV, str(SHARED))
    s = loader(config=D.LoadConfig(k_user=0, k_item=0))
    # Duplicate (user, item) events collapse to one positive; every user keeps one test item.
    n_pairs = np.unique(raw.users * (raw.items.max() + 1) + raw.items).size
    assert len(s.train_users) + len(s.test_users) == n_pairs
    assert len(s.test_users) == s.n_users == n_users
    assert all(len(q) >= 1 for q in s.train_sequences)


def test_recsys_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(D.RECSYS_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"Beauty.txt not found.*LIDU_BEAUTY"):
        D.beauty()

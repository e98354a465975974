"""The per-text embedding cache on disk: hits, owners, LRU eviction, reopening."""

from __future__ import annotations

from pathlib import Path

from dispatcher.store.embed_cache import EmbedCache, text_key

VECTOR = [0.5, -0.25, 1.0, 0.125]  # exact in float32
SIZE = 4 * len(VECTOR)


def _opened(path: Path, max_bytes: int = 1 << 20) -> EmbedCache:
    cache = EmbedCache(path, max_bytes=max_bytes)
    cache.open()
    return cache


def test_a_put_text_is_a_hit_before_and_after_its_commit(tmp_path: Path) -> None:
    """A stored vector is found at once from the buffer and after the commit from disk."""
    cache = _opened(tmp_path / "e.sqlite3")
    key = text_key("m", None, "hello")
    cache.put(key, VECTOR)
    assert cache.get([key]) == {key: VECTOR}
    cache.close()
    reopened = _opened(tmp_path / "e.sqlite3")
    assert reopened.get([key, text_key("m", None, "other")]) == {key: VECTOR}
    assert (reopened.hits, reopened.misses) == (1, 1)
    reopened.close()


def test_owners_and_models_have_their_own_entries() -> None:
    """The same text under another owner or model is another key."""
    keys = {text_key("m", None, "t"), text_key("m", "uid:1", "t"), text_key("n", None, "t")}
    assert len(keys) == 3


def test_past_max_bytes_the_least_recently_used_go(tmp_path: Path) -> None:
    """Past embed_max_bytes the commit evicts the entries used longest ago."""
    clock = iter(range(100))
    cache = EmbedCache(tmp_path / "e.sqlite3", max_bytes=2 * SIZE, wall=lambda: next(clock))
    cache.open()
    old, used, new = (text_key("m", None, t) for t in ("old", "used", "new"))
    cache.put(old, VECTOR)
    cache.put(used, VECTOR)
    cache.close()
    cache.open()
    cache.get([used])  # used again: now the most recent of the two
    cache.put(new, VECTOR)
    cache.close()
    cache.open()
    assert set(cache.get([old, used, new])) == {used, new}
    assert cache.bytes == 2 * SIZE
    cache.close()

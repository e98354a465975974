"""Packing embeddings texts into shared requests: the pure decisions, with explicit inputs."""

from __future__ import annotations

from dispatcher.core.packing import linger_s, oversized, pack, scarce


def _texts(*texts: str) -> list[tuple[int, str, int]]:
    return [(index, text, 1) for index, text in enumerate(texts)]


def test_pack_takes_jobs_in_serving_order_up_to_max_batch() -> None:
    """Texts of several jobs fill one request in the order given, and the request is full."""
    decided = pack([_texts("a", "b"), _texts("c"), _texts("d")], max_batch=3)
    assert decided.texts == ["a", "b", "c"]
    assert decided.takes == [[(0, 0), (1, 1)], [(0, 2)], []]
    assert decided.full


def test_pack_splits_a_job_larger_than_one_request() -> None:
    """A job with more texts than a request holds gives its first texts, in input order."""
    decided = pack([_texts("a", "b", "c", "d", "e")], max_batch=2)
    assert decided.texts == ["a", "b"]
    assert decided.takes == [[(0, 0), (1, 1)]]


def test_pack_sends_identical_texts_once() -> None:
    """The same text from two jobs (or twice in one) takes one place in the request."""
    decided = pack([_texts("a", "a"), _texts("b", "a")], max_batch=2)
    assert decided.texts == ["a", "b"]
    assert decided.takes == [[(0, 0), (1, 0)], [(0, 1), (1, 0)]]


def test_pack_stops_at_the_request_token_cap() -> None:
    """A text that would take the request over max_request_tokens waits for the next one."""
    waiting = [[(0, "a", 6), (1, "b", 6)], [(0, "c", 1)]]
    decided = pack(waiting, max_batch=32, max_request_tokens=10)
    assert decided.texts == ["a"]
    assert decided.tokens == 6
    assert decided.full


def test_pack_always_takes_a_first_text() -> None:
    """A single text larger than the token cap still goes alone: admission sized it."""
    decided = pack([[(0, "big", 50)]], max_batch=32, max_request_tokens=10)
    assert decided.texts == ["big"]


def test_tokens_are_scarce_only_with_a_rate_and_few_left() -> None:
    """No rate is plenty; a rate with no more tokens left than the concurrency is scarce."""
    assert not scarce(None, 5)
    assert scarce(5, 5)
    assert scarce(1, 0)
    assert not scarce(40, 5)


def test_a_request_lingers_only_while_tokens_are_scarce() -> None:
    """A partial request waits out the linger when tokens are scarce, never when plentiful."""
    common = {"texts": 3, "max_batch": 32, "full": False, "linger_s": 0.05}
    assert linger_s(scarce=True, waited_s=0.01, **common) == 0.05 - 0.01
    assert linger_s(scarce=True, waited_s=0.2, **common) == 0.0
    assert linger_s(scarce=False, waited_s=0.0, **common) == 0.0


def test_a_full_request_never_lingers() -> None:
    """A request that cannot grow goes at once, however scarce the tokens."""
    assert linger_s(texts=32, max_batch=32, full=True, scarce=True, waited_s=0, linger_s=1) == 0


def test_oversized_names_the_first_text_over_the_limit() -> None:
    """The first text over the per-text limit is reported with its index and size."""
    assert oversized([3, 700, 900], 512) == (1, 700)
    assert oversized([3, 4], 512) is None

"""WeakCache: entries per owner, gone with their owner, at most `size` per owner, least recently used first out."""

from __future__ import annotations

import gc

import pytest

from gradmagic.core.questions.caches import WeakCache


class Owner:
    """Any object that takes a weak reference (a model, a layer, a class)."""


def test_values_are_kept_per_owner_and_key():
    cache, a, b = WeakCache(size=4), Owner(), Owner()
    cache.store(a, "a1", key=1)
    cache.store(b, "b1", key=1)
    assert cache.lookup(a, 1) == "a1" and cache.lookup(b, 1) == "b1"
    assert cache.lookup(a, 2) is None and cache.lookup(Owner()) is None


def test_size_one_holds_the_current_value():
    cache, owner = WeakCache(), Owner()
    assert cache.store(owner, "first") == "first"
    cache.store(owner, "second")
    assert cache.lookup(owner) == "second" and len(cache[owner]) == 1


def test_the_least_recently_used_entry_goes_first():
    cache, owner = WeakCache(size=2), Owner()
    cache.store(owner, "one", key=1)
    cache.store(owner, "two", key=2)
    cache.lookup(owner, 1)  # 1 is now the most recently used
    cache.store(owner, "three", key=3)
    assert list(cache[owner]) == [1, 3]


def test_entries_go_with_their_owner_and_never_keep_it_alive():
    cache, owner = WeakCache(), Owner()
    cache.store(owner, "value")
    assert owner in cache
    del owner
    gc.collect()
    assert len(cache._owners) == 0


def test_drop_and_clear():
    cache, a, b = WeakCache(size=3), Owner(), Owner()
    for owner in (a, b):
        cache.store(owner, "x", key="x")
        cache.store(owner, "y", key="y")
    cache.drop(a, "x")
    cache.drop(a, "not stored")  # nothing to drop: no error
    assert list(cache[a]) == ["y"]
    cache.clear(a)
    assert cache.get(a) is None and list(cache.get(b, {})) == ["x", "y"]
    cache.clear()
    assert cache.get(b, {}) == {}


def test_the_entries_view_is_read_only():
    cache, owner = WeakCache(), Owner()
    cache.store(owner, "value", key="k")
    with pytest.raises(TypeError):
        cache[owner]["k"] = "other"  # type: ignore[index]


def test_a_size_below_one_is_refused():
    with pytest.raises(ValueError, match="size=0"):
        WeakCache(size=0)

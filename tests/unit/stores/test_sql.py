"""The queries both backends share (stores/sql.py), hotword lists above all, on each backend (the
`store` fixture: SQLite and a real PostgreSQL server)."""

import threading

import pytest

from speech_serve.stores.base import checked_hotwords
from speech_serve.voiceprints import open_store
from tests.support.fakes import vec


def test_hotwords_are_set_replaced_whole_and_deleted(store):
    assert store.hotwords("home") == {}
    rev = store.revision()
    store.set_hotwords("home", {"turn on the lights": 2.0, "Kitchen": 1.5})
    assert store.hotwords("home") == {"Kitchen": 1.5, "turn on the lights": 2.0}
    store.set_hotwords("home", {"good night": 3})  # replaces: the old phrases are gone
    assert store.hotwords("home") == {"good night": 3.0}
    store.set_hotwords("home", {})  # an empty list deletes it
    assert store.hotwords("home") == {}
    assert store.revision() == rev + 3  # each set moves the revision: refreshers read again


def test_each_household_has_its_own_list(store):
    store.set_hotwords("home", {"lights": 1.0})
    store.set_hotwords("office", {"projector": 2.0})
    store.set_hotwords("home", {})
    assert (store.hotwords("home"), store.hotwords("office")) == ({}, {"projector": 2.0})
    store.create("alice", "home", "ge2e", [vec(1, 0)])  # voiceprints and hotwords do not touch
    assert store.hotwords("office") == {"projector": 2.0} and [v.name for v in store.list()] == ["alice"]


def test_bad_hotwords_are_refused_and_change_nothing(store):
    store.set_hotwords("home", {"lights": 1.0})
    rev = store.revision()
    for bad in ({"": 1.0}, {"   ": 1.0}, {"x": float("nan")}, {"x": float("inf")}, {"x": "2"}, {"x": True}):
        with pytest.raises(ValueError, match="hotword"):
            store.set_hotwords("home", bad)
    assert store.hotwords("home") == {"lights": 1.0} and store.revision() == rev


def test_checked_hotwords_keeps_phrases_and_makes_weights_floats():
    assert checked_hotwords({"a b": 2, "c": 0.5}) == {"a b": 2.0, "c": 0.5}


def test_writers_replacing_one_list_at_once_leave_one_list_whole(store):
    """set_hotwords is atomic: concurrent replacements never merge into a mix of two lists, and a
    reader meanwhile sees one whole list (or none, before the first)."""
    url = getattr(store, "_url", None) or str(store.path)
    lists = [{f"w{w}-{i}": float(i) for i in range(20)} for w in range(4)]
    seen, ready, done = [], threading.Event(), threading.Event()

    def replace(hotwords: dict, times: int) -> None:
        mine = open_store(url)  # its own connections, as another process would have
        for _ in range(times):
            mine.set_hotwords("home", hotwords)

    def read() -> None:
        mine = open_store(url)
        seen.append(mine.hotwords("home"))
        ready.set()  # on a busy host the writers could otherwise finish before the first read
        while not done.is_set():
            seen.append(mine.hotwords("home"))

    reader = threading.Thread(target=read)
    reader.start()
    assert ready.wait(timeout=60)
    writers = [threading.Thread(target=replace, args=(hw, 15)) for hw in lists]
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    done.set()
    reader.join(timeout=60)
    assert store.hotwords("home") in lists and store.revision() == 60
    mixed = [sorted(hw) for hw in seen if hw not in [{}, *lists]]
    assert seen and not mixed, mixed[:1]

"""Household hotwords (ingress/hotwords.py): the admin API's bodies over a real store, each household's
list applied to its own sessions' utterances only (the session's own list on top), a list written
through one replica reaching another without a restart, bad lists refused with why."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import HTTPException

from speech_serve.ingress.hotwords import HotwordsAdmin, HouseholdHotwords
from speech_serve.ingress.stream.calls import ModelCalls
from speech_serve.ingress.stream.stream import Recognition
from speech_serve.messages import RecognitionOptions, Transcript, Utterance
from speech_serve.settings import AppSettings
from speech_serve.voiceprints import StoreUnavailable, open_store

TEXT = Transcript("turn on the light", "en", "neutral", "Speech", "<|en|>turn on the light")


def put(body) -> SimpleNamespace:
    """A request whose JSON body is `body` (what HotwordsAdmin.put reads of it)."""

    async def read():
        if isinstance(body, bytes):
            raise json.JSONDecodeError("not JSON", "", 0)
        return body

    return SimpleNamespace(json=read)


def replica(store, settings: AppSettings):
    """One Ingress replica's pieces: its household lists, admin API and recognition (SenseVoice
    records each request it gets)."""
    household = HouseholdHotwords(store, settings.voiceprints)
    asked: list = []

    async def transcribe(request):
        asked.append(request)
        return TEXT

    asr = SimpleNamespace(transcribe=SimpleNamespace(remote=transcribe))
    recognition = Recognition(ModelCalls(None, asr, None, settings), settings, "test", household=household)
    return HotwordsAdmin(store, household, settings.limits), household, recognition, asked


async def until(condition, what: str) -> None:
    """A hang guard, not a speed bound."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


UTTERANCE = Utterance(0, 0, 1000, np.zeros(16000, np.int16))
SETTINGS = AppSettings(speaker={"enabled": False}, voiceprints={"refresh_s": 0.02})


def test_a_households_list_reaches_its_own_sessions_only_under_the_sessions_own(tmp_path):
    async def scenario():
        admin, household, recognise, asked = replica(open_store(str(tmp_path / "vp.sqlite3")), SETTINGS)
        answer = await admin.put(put({"hotwords": {"turn on the light": 2, "Xiaozhi": 1}}), "kitchen")
        assert answer == {"group": "kitchen", "hotwords": {"turn on the light": 2.0, "Xiaozhi": 1.0}}
        for group in ("kitchen", "garage"):
            household.watch(group)
        await until(lambda: household.lists["kitchen"], "the kitchen's list loaded")
        own = RecognitionOptions(speaker_group="kitchen", hotwords=(("Xiaozhi", 3.0), ("lamp", 1.5)))
        for options in (RecognitionOptions(speaker_group="kitchen"), own, RecognitionOptions(speaker_group="garage"),
                        RecognitionOptions(speaker_group="garage", hotwords=(("lamp", 1.5),))):  # fmt: skip
            await recognise("s1", UTTERANCE, options)
        return [dict(r.hotwords) for r in asked], await admin.get("garage")

    lists, garage = asyncio.run(scenario())
    assert lists == [
        {"turn on the light": 2.0, "Xiaozhi": 1.0},
        {"turn on the light": 2.0, "Xiaozhi": 3.0, "lamp": 1.5},  # the session's weight wins
        {},  # another household: nothing of the kitchen's
        {"lamp": 1.5},
    ]
    assert garage == {"group": "garage", "hotwords": {}}


def test_a_list_written_through_one_replica_reaches_another_and_survives_a_restart(tmp_path):
    path = str(tmp_path / "vp.sqlite3")

    async def scenario():
        admin_a, _, _, _ = replica(open_store(path), SETTINGS)
        _, household_b, recognise_b, asked_b = replica(open_store(path), SETTINGS)
        household_b.watch("kitchen")
        await admin_a.put(put({"hotwords": ["Xiaozhi"]}), "kitchen")
        await until(lambda: household_b.lists["kitchen"] == (("Xiaozhi", 1.5),), "replica B reloaded")
        await recognise_b("s1", UTTERANCE, RecognitionOptions(speaker_group="kitchen"))
        await admin_a.delete("kitchen")
        await until(lambda: household_b.lists["kitchen"] == (), "replica B saw the delete")
        await admin_a.put(put({"hotwords": {"lamp": 2}}), "kitchen")
        return asked_b

    asked = asyncio.run(scenario())
    assert asked[0].hotwords == (("Xiaozhi", 1.5),)
    assert open_store(path).hotwords("kitchen") == {"lamp": 2.0}  # a new process reads it back


@pytest.mark.parametrize(
    "body, why",
    [
        (b"{", "send JSON"),
        ({"words": ["a"]}, '{"hotwords"'),
        ({"hotwords": {"a": -1}}, "positive"),
        ({"hotwords": ["x" * 41]}, "1 to 40 characters"),
        ({"hotwords": [f"w{i}" for i in range(101)]}, "at most 100"),
    ],
)
def test_a_bad_list_is_refused_with_why_and_the_stored_one_stays(tmp_path, body, why):
    store = open_store(str(tmp_path / "vp.sqlite3"))
    admin, *_ = replica(store, SETTINGS)
    asyncio.run(admin.put(put({"hotwords": ["lamp"]}), "kitchen"))
    with pytest.raises(HTTPException) as err:
        asyncio.run(admin.put(put(body), "kitchen"))
    assert err.value.status_code == 400 and why in err.value.detail
    assert store.hotwords("kitchen") == {"lamp": 1.5}
    with pytest.raises(HTTPException) as err:
        asyncio.run(admin.get("x" * 2000))
    assert err.value.status_code == 400


def test_a_store_that_cannot_be_read_leaves_utterances_their_sessions_own_lists(tmp_path, caplog):
    bad = tmp_path / "not-a-db.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)

    async def scenario():
        admin, household, recognise, asked = replica(open_store(str(bad)), SETTINGS)
        household.watch("kitchen")
        await household.load("kitchen")
        await recognise("s1", UTTERANCE, RecognitionOptions(speaker_group="kitchen", hotwords=(("lamp", 1.5),)))
        with pytest.raises(StoreUnavailable):  # the routes answer it 503 (routes.store_unavailable)
            await admin.get("kitchen")
        return asked

    assert asyncio.run(scenario())[0].hotwords == (("lamp", 1.5),)
    assert "household hotwords not loaded" in caplog.text

"""Per-household hotword lists: the admin API `/v1/hotwords/{group}` (GET, PUT, DELETE; the admin
token, like /v1/speakers) over the voiceprint store, and the lists this Ingress applies to every
utterance of a household's sessions and uploads (the session's own hotwords on top).

The lists live in the store beside the voiceprints, so every Ingress sharing the store sees them: a
replica polls the store's revision every `voiceprints.refresh_s` and reloads the lists of the
households it serves. A list set through this replica applies here at once, on the others within
that poll; no restart, no redeploy. Recognition only reads `lists` (a dict: nothing on the utterance
path waits for the store); a household's list is loaded when its first session opens.

A household sees its own list only: an utterance is decoded with the list of its session's group
(its device's household, or the group a plain session names), never another's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from fastapi import HTTPException, Request
from fastapi.responses import Response

from speech_serve.ingress.protocols.parsing import ProtocolError, hotword_list
from speech_serve.settings import LimitSettings, VoiceprintSettings
from speech_serve.voiceprints import StoreUnavailable, VoiceprintStore

logger = logging.getLogger("ray.serve")
Hotwords = tuple[tuple[str, float], ...]  # (phrase, bonus per token), as RecognitionOptions has them


class HouseholdHotwords:
    """The lists of the households this replica serves, kept fresh from the store."""

    def __init__(self, store: VoiceprintStore, settings: VoiceprintSettings):
        self.store, self.refresh_s, self.max_groups = store, settings.refresh_s, settings.cached_groups
        self.lists: OrderedDict[str, Hotwords] = OrderedDict()  # the least recently opened first
        self._revision: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._poll: asyncio.Task | None = None
        self._unavailable = False  # said once per outage, not once per session

    def watch(self, group: str) -> None:
        """A session of `group` opens: its list loads now (in the background) and is kept fresh."""
        if group in self.lists:
            self.lists.move_to_end(group)
            return
        self.lists[group] = ()
        while len(self.lists) > self.max_groups:
            self.lists.popitem(last=False)
        self._spawn(self.load(group))
        if self._poll is None or self._poll.done():
            self._poll = self._spawn(self._follow())

    def set(self, group: str, hotwords: Hotwords) -> None:
        """This replica's admin API wrote the list: it applies here at once."""
        if group in self.lists:
            self.lists[group] = hotwords

    async def load(self, group: str) -> None:
        """The group's list from the store (a missing or unreachable store leaves the list as it was)."""
        try:
            stored = await asyncio.to_thread(self.store.hotwords, group)
        except StoreUnavailable as exc:
            if not self._unavailable:
                logger.warning("household hotwords not loaded (%s); utterances go on with their sessions' own", exc)
            self._unavailable = True
            return
        self._unavailable = False
        if group in self.lists:
            self.lists[group] = tuple(stored.items())

    async def _follow(self) -> None:
        """Reload every served list whenever the store changed (another replica wrote one)."""
        while self.lists:
            await asyncio.sleep(self.refresh_s)
            try:
                revision = await asyncio.to_thread(self.store.revision)
            except StoreUnavailable:
                continue
            if revision != self._revision:
                self._revision = revision
                await asyncio.gather(*(self.load(group) for group in list(self.lists)))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # kept until done: the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)
        return task


class HotwordsAdmin:
    """The bodies of `/v1/hotwords/{group}`. PUT takes `{"hotwords": {phrase: weight} | [phrase, ...]}`,
    bounded as a session's list is (`limits.max_hotwords`, `max_hotword_chars`, weights up to
    `max_hotword_weight`; a phrase without a weight gets `hotword_weight`), and replaces the list."""

    def __init__(self, store: VoiceprintStore, household: HouseholdHotwords, limits: LimitSettings):
        self.store, self.household, self.limits = store, household, limits

    async def get(self, group: str) -> dict:
        return {"group": group, "hotwords": await asyncio.to_thread(self.store.hotwords, self._group(group))}

    async def put(self, request: Request, group: str) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, 'send JSON: {"hotwords": {"phrase": weight, ...}}') from None
        if not isinstance(body, dict) or set(body) != {"hotwords"}:
            raise HTTPException(400, 'send {"hotwords": {"phrase": weight, ...}} or {"hotwords": ["phrase", ...]}')
        try:
            hotwords = hotword_list(body["hotwords"], self.limits)
        except ProtocolError as exc:
            raise HTTPException(400, str(exc)) from None
        await asyncio.to_thread(self.store.set_hotwords, self._group(group), dict(hotwords))
        self.household.set(group, hotwords)
        return {"group": group, "hotwords": dict(hotwords)}

    async def delete(self, group: str) -> Response:
        await asyncio.to_thread(self.store.set_hotwords, self._group(group), {})
        self.household.set(group, ())
        return Response(status_code=204)

    def _group(self, group: str) -> str:
        if not group.strip() or len(group) > self.limits.max_field_chars:
            raise HTTPException(400, f"a group is 1 to {self.limits.max_field_chars} characters")
        return group

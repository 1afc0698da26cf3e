"""A cluster's shared state, end to end on a real Ray Serve (see conftest.py): two Ingress replicas share
one PostgreSQL voiceprint store (the test server, tests/support/postgres.py; its URL read from the
environment, `voiceprints.store: env:...`, as on Kubernetes).

An application of its own beside the shared one (tiny models, one VADHost, the GE2E speaker model the
other speaker tests use), logging JSON as config/production.yaml does. Eight enrolments at once through
its two Ingress replicas all land; every listing, from both replicas, holds them all; a session streamed
afterwards names the speakers, whose voiceprints the Speaker replica read from the same database. A
household's hotword list set through the admin API reaches its sessions' next utterances, whichever
replica serves them, and never another household's. Every replica's log is JSON lines, and the internal
deployments keep their access log off.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import ray

from speech_serve.ingress.drain import _serve_controller
from speech_serve.wire.client import stream_file
from tests.support.audio import FIXTURES, TWO_UTTERANCES_WAV
from tests.support.service import ADMIN, STORE_ENV, TEST_DEVICE, TEST_GROUP, app_beside, as_device

pytestmark = pytest.mark.integration
APP, PREFIX = "shared-store", "/shared-store"
VOICES = FIXTURES / "voices"
THREE = str(VOICES / "three_speakers.wav")
WAV = str(TWO_UTTERANCES_WAV)
# name, group, clip: alice and bob in the test device's household; six more elsewhere, made at the same time
ENROLMENTS = [("alice", TEST_GROUP, "alice_enroll_1.wav"), ("bob", TEST_GROUP, "bob_enroll_1.wav")] + [
    (f"crowd-{i}", f"crowd-{i % 3}", ("alice", "bob")[i % 2] + "_enroll_2.wav") for i in range(6)
]
LIST_QUERY = "%FROM speakers s LEFT JOIN embeddings e%ORDER BY s.created_at%"  # SqlStore.list's query


@pytest.fixture(scope="module")
def app(service, service_args) -> str:
    """http://host:port/shared-store: the app, two Ingress replicas on the PostgreSQL store; deleted afterwards."""
    args = copy.deepcopy(service_args)
    args["voiceprints"] = {"store": f"env:{STORE_ENV}"}
    args["placement"]["Ingress"] = {"num_cpus": 0, "num_replicas": 2}
    args["placement"]["VADHost"] = {"num_cpus": 0, "num_replicas": 1}
    args["uploads"] = {"max_concurrent_enrolments": len(ENROLMENTS)}  # each replica takes all of them at once
    args["logging"] = {"encoding": "JSON"}  # as config/production.yaml
    with app_beside(service, args, APP, PREFIX) as base:
        yield base


def ingress_pids() -> set[int]:
    details = ray.get(_serve_controller().get_deployment_details.remote(APP, "Ingress"))
    return {r.pid for r in details.replicas if str(r.state.value) == "RUNNING"}


def pids_that_listed_since(started: float) -> set[int]:
    """The processes whose store connections ran SqlStore.list since `started` (pg_stat_activity
    shows each connection's last query; our application_name starts with the process id)."""
    with psycopg.connect(os.environ[STORE_ENV]) as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE %s AND query_start >= to_timestamp(%s)", (LIST_QUERY, started)).fetchall()  # fmt: skip
    return {int(name.split()[1]) for (name,) in rows if name.startswith("speech-serve ")}


def enrol(base: str, name: str, group: str, clip: str) -> httpx.Response:
    files = [("files", (clip, (VOICES / clip).read_bytes(), "audio/wav"))]
    return httpx.post(f"{base}/v1/speakers", headers=ADMIN, data={"name": name, "group": group}, files=files,
                      timeout=120)  # fmt: skip


def test_enrolments_through_two_ingress_replicas_all_land_and_name_the_speakers(app, service):
    assert len(pids := ingress_pids()) == 2
    with ThreadPoolExecutor(len(ENROLMENTS)) as pool:  # all at once: Serve spreads them over both replicas
        answers = list(pool.map(lambda e: enrol(app, *e), ENROLMENTS))
    assert [r.status_code for r in answers] == [201] * len(ENROLMENTS), [r.text for r in answers]
    enrolled = {r.json()["id"]: r.json()["name"] for r in answers}
    assert sorted(enrolled.values()) == sorted(name for name, _, _ in ENROLMENTS)

    started = time.time() - 1  # pg_stat_activity's clock is this host's too
    listings = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(4):  # until both replicas have answered (each round: 8 listings at once)
            listings += pool.map(lambda _: httpx.get(f"{app}/v1/speakers", headers=ADMIN, timeout=30), range(8))
            if pids_that_listed_since(started) >= pids:
                break
    assert pids_that_listed_since(started) >= pids, "one Ingress replica answered every listing"
    for r in listings:  # whichever replica answered, nothing is missing
        assert r.status_code == 200 and {v["id"] for v in r.json()["speakers"]} >= set(enrolled)

    time.sleep(1.5)  # the Speaker replica looks for new enrolments every refresh_s (1 s)
    results = stream_file(f"ws://{service}{PREFIX}/v1/stream", THREE, speaker_group=TEST_GROUP, **as_device())
    labels = [r["speaker"]["label"] for r in results]
    assert labels == ["alice", "bob", "unknown"], labels


HOTWORD = "w100 w200"  # two of the tiny model's words: its flat posteriors put any hotword within its bonus


def texts(base: str, device: str) -> list[str]:
    return [r["text"] for r in stream_file(f"ws://{base}/v1/stream", WAV, **as_device(device))]


def test_a_households_hotwords_reach_its_next_utterances_on_every_replica_and_no_other_household(app, service):
    base = f"{service}{PREFIX}"
    other = "02:00:00:00:0e:01"  # unmapped: a household of its own
    assert not any(HOTWORD in t for t in texts(base, TEST_DEVICE))
    put = httpx.put(f"{app}/v1/hotwords/{TEST_GROUP}", headers=ADMIN, json={"hotwords": {HOTWORD: 3}}, timeout=30)
    assert put.status_code == 200 and put.json() == {"group": TEST_GROUP, "hotwords": {HOTWORD: 3.0}}
    bad = httpx.put(f"{app}/v1/hotwords/{TEST_GROUP}", headers=ADMIN, json={"hotwords": {"x": -1}}, timeout=30)
    assert bad.status_code == 400 and "positive" in bad.json()["detail"]
    assert httpx.get(f"{app}/v1/hotwords/{TEST_GROUP}", timeout=30).status_code == 401  # the admin token only
    time.sleep(1.5)  # the other replica reloads the lists when the store's revision moves (refresh_s: 1 s)
    for _ in range(2):  # sessions land on either replica
        assert all(HOTWORD in t for t in texts(base, TEST_DEVICE))
    assert not any(HOTWORD in t for t in texts(base, other))
    assert httpx.delete(f"{app}/v1/hotwords/{TEST_GROUP}", headers=ADMIN, timeout=30).status_code == 204
    time.sleep(1.5)
    assert not any(HOTWORD in t for t in texts(base, TEST_DEVICE))


def test_every_replica_logs_json_lines_and_the_internal_deployments_keep_their_access_log_off(app):
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    for name in ("Ingress", "VADHost", "SenseVoice", "Speaker"):
        paths = glob.glob(os.path.join(logs, f"replica_{APP}_{name}_*.log"))
        records = [json.loads(line) for path in paths for line in open(path) if line.strip()]  # each a JSON object
        assert records and all("message" in r for r in records), name
        access = [r for r in records if r["message"].split()[:1] in (["GET"], ["POST"], ["PUT"], ["CALL"])]
        assert bool(access) == (name == "Ingress"), (name, access[:3])  # the Ingress keeps its access log

from speech_serve.replicas.lane_router import choose_replica, replica_loads, sticky_key


def test_new_session_goes_to_the_least_loaded_replica():
    pins = {}
    assert choose_replica("s1", pins, {"a": 3, "b": 1, "c": 2}) == "b"
    assert pins == {"s1": "b"}


def test_pinned_session_stays_even_when_its_replica_is_busiest():
    pins = {"s1": "a"}
    assert choose_replica("s1", pins, {"a": 50, "b": 0}) == "a"
    assert pins == {"s1": "a"}


def test_session_is_repinned_when_its_replica_is_gone():
    pins = {"s1": "gone", "s2": "b"}
    assert choose_replica("s1", pins, {"a": 2, "b": 1}) == "b"
    assert pins["s1"] == "b"


def test_ties_are_broken_deterministically():
    assert choose_replica("s", {}, {"b": 0, "a": 0}) == "a"


def test_no_replicas_means_no_choice_and_no_pin():
    pins = {}
    assert choose_replica("s", pins, {}) is None
    assert pins == {}


def test_calls_without_a_session_are_not_pinned():
    pins = {}
    assert choose_replica(None, pins, {"a": 1, "b": 0}) == "b"
    assert pins == {}


def test_loads_count_local_pins_not_yet_reported():
    pins = {"s1": "a", "s2": "a", "s3": "b"}
    assert replica_loads(pins, {"a": 0, "b": 5, "c": 1}) == {"a": 2, "b": 5, "c": 1}


def test_a_burst_of_new_sessions_spreads_over_replicas():
    pins: dict[str, str] = {}
    reported = {"a": 0, "b": 0, "c": 0}  # stats lag: every replica still reports zero
    for i in range(9):
        choose_replica(f"s{i}", pins, replica_loads(pins, reported))
    assert sorted(replica_loads(pins, reported).values()) == [3, 3, 3]


def test_the_sticky_key_is_the_lane_of_batched_feeds_only():
    assert sticky_key("feed_many", ("lane-0", []), {}) == "lane-0"
    assert sticky_key("feed_many", (), {"lane": "lane-1", "items": []}) == "lane-1"
    assert sticky_key("segment_piece", ("file-1", None, 0, False), {}) == "file-1"  # an upload's own lane
    assert sticky_key("reconfigure", ("not-a-lane",), {}) is None


def test_an_uploads_lane_keeps_its_replica_until_its_drop_which_releases_the_pin():
    pins: dict[str, str] = {}
    loads = {"a": 0, "b": 1}
    assert choose_replica("file-1", pins, loads) == "a"
    assert choose_replica("file-1", pins, {"a": 9, "b": 1}) == "a"  # sticky, as a session lane
    assert choose_replica("file-1", pins, {"a": 9, "b": 1}, release=True) == "a"  # the drop goes where the cut is
    assert pins == {}  # one-off lanes do not pile up in the router (or count as load)
    assert choose_replica("file-2", pins, {"a": 9, "b": 1}, release=True) == "b" and pins == {}


def test_the_router_asks_serve_to_back_off_before_it_retries():
    """Serve retries a routing decision without any pause unless the router says its choice
    considered every replica (`should_backoff`); a pinned replica whose queue-length probe is
    slow then spins the router thread and starves the Ingress (seen in a replica-loss test)."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.request_router.common import RequestRoutingContext

    from speech_serve.replicas.lane_router import LaneRouter

    router = object.__new__(LaneRouter)  # Serve builds it with its own plumbing; the state is ours
    router.initialize_state()
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats={}) for rid in ("a", "b")]
    pending = SimpleNamespace(metadata=SimpleNamespace(call_method="feed_many"), args=("lane-0", []), kwargs={},
                              routing_context=RequestRoutingContext())  # fmt: skip
    assert not pending.routing_context.should_backoff
    chosen = asyncio.run(router.choose_replicas(replicas, pending))
    assert [[r.replica_id.unique_id for r in group] for group in chosen] == [["a"]]
    assert pending.routing_context.should_backoff

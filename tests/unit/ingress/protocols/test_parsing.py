"""What the protocols share (protocols/parsing.py): hotword lists in every shape a client sends,
bounded, with a clear error; the smaller helpers are fuzzed with each protocol (test_fuzz.py)."""

import pytest

from speech_serve.ingress.protocols.parsing import ProtocolError, hotword_list, text_delta, whole_number
from speech_serve.settings import LimitSettings

LIMITS = LimitSettings(max_hotwords=3, max_hotword_chars=10, hotword_weight=1.5, max_hotword_weight=5.0)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, ()), ("", ()), ([], ()), ({}, ()),
        ({"lights": 2, "Xiaozhi": 0.5}, (("lights", 2.0), ("Xiaozhi", 0.5))),
        (["a b", " c "], (("a b", 1.5), ("c", 1.5))),  # a phrase may hold spaces; the default weight
        ("alpha, beta gamma", (("alpha", 1.5), ("beta", 1.5), ("gamma", 1.5))),  # FunASR's older clients
        ({"loud": 99}, (("loud", 5.0),)),  # cut to max_hotword_weight
    ],
)  # fmt: skip
def test_hotwords_in_every_shape_a_client_sends(value, expected):
    assert hotword_list(value, LIMITS) == expected


def test_a_weight_scale_turns_funasrs_tens_into_a_bonus_per_token():
    assert hotword_list({"阿里巴巴": 20}, LIMITS, scale=20) == (("阿里巴巴", 1.0),)


@pytest.mark.parametrize(
    "value, says",
    [
        (5, "object"), ({"a": 1, "b": 1, "c": 1, "d": 1}, "at most 3"), ({"x" * 11: 1}, "1 to 10 characters"),
        ({" ": 1}, "1 to 10"), ({"a": 0}, "positive"), ({"a": True}, "positive"), ({"a": "2"}, "positive"),
        ([3], "1 to 10"),
    ],
)  # fmt: skip
def test_a_bad_list_is_named_in_a_short_error(value, says):
    with pytest.raises(ProtocolError) as err:
        hotword_list(value, LIMITS)
    assert err.value.code == "bad_hotwords" and says in str(err.value) and len(str(err.value)) < 120


def test_whole_numbers_and_deltas():
    assert [whole_number(v) for v in (16000, 16000.0, 16000.5, True, "16000")] == [16000, 16000, None, None, None]
    assert text_delta("turn on", "turn on the light") == " the light" and text_delta("turn of", "turn on") is None

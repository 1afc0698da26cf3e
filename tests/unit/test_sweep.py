"""The capacity sweep's arithmetic: which level counts as held, the speech share, the report."""

import numpy as np

from loadtest.loadgen import Clip
from loadtest.sweep import TRANSPORT_KINDS, Level, SweepConfig, held_devices, render, speech_share


def level(offered, admitted, lost, p95, cores=None) -> Level:
    return Level(offered=offered, admitted=admitted, refused=offered - admitted, utterances=8 * admitted, lost=lost,
                 p50_s=p95 and p95 / 2, p95_s=p95, wall_s=40.0, cores=cores or {}, connection_errors=0,
                 error_frames=0, drained=True)  # fmt: skip


def test_held_is_the_most_admitted_devices_on_target_with_nothing_lost():
    levels = [level(1, 1, 0, 1.2), level(4, 4, 0, 2.9), level(8, 8, 0, 3.4), level(12, 12, 3, 2.0)]
    assert held_devices(levels, 3.0) == 4  # 8 is over the target, 12 lost utterances
    assert held_devices(levels, 3.5) == 8
    # Offered more than the cap: the admitted ones count, the refused do not.
    assert held_devices([level(16, 9, 0, 2.5)], 3.0) == 9
    assert held_devices([level(2, 2, 1, 1.0)], 3.0) == 0


def test_speech_share_is_mean_clip_over_clip_plus_mean_pause():
    clips = [Clip("a", np.zeros(16000 * 2, dtype=np.int16), None), Clip("b", np.zeros(16000 * 4, dtype=np.int16), None)]
    assert speech_share(clips, (1.0, 3.0)) == 3 / 5


def test_transport_cores_per_device_and_report():
    lv = level(4, 4, 0, 2.0, cores={"proxy": 0.1, "Ingress": 0.2, "VADHost": 0.1, "SenseVoice": 1.2})
    assert lv.cores_per_device(TRANSPORT_KINDS) == 0.1
    assert lv.cores_per_device(TRANSPORT_KINDS, {"proxy": 0.02, "Ingress": 0.02, "SenseVoice": 0.5}) == 0.09
    report = render(SweepConfig(), [lv], {"SenseVoice": 0.01}, {"speech_s_per_s": 6.0, "batch": 8, "threads": 2,
                                                                "model": "test"}, 0.6)  # fmt: skip
    assert "compute bound" in report and "**10.0 devices**" in report
    assert "held at p95 <= 3 s with nothing lost: 4**" in report and "held / bound = **0.40**" in report
    assert report.count("SenseVoice cores") == 1

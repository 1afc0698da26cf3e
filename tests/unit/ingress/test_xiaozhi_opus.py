import numpy as np
import pytest

from speech_serve.ingress.protocols.xiaozhi import OpusDecoder
from speech_serve.messages import AudioFormatError
from speech_serve.wire.opus import encode_pcm


def test_opus_round_trip_keeps_the_speech(two_utterances):
    packets = encode_pcm(two_utterances, frame_ms=60)
    assert len(packets) == pytest.approx(len(two_utterances) / 960, abs=2)
    decoder = OpusDecoder()
    out = np.concatenate([decoder.decode(p) for p in packets])
    assert abs(len(out) - len(two_utterances)) < 2000 and out.dtype == np.int16
    a, b = two_utterances[4000:100000].astype(float), out[4000:100000].astype(float)
    lag = max(range(0, 400, 4), key=lambda s: np.corrcoef(a, out[4000 + s : 100000 + s].astype(float))[0, 1])
    assert np.corrcoef(a, out[4000 + lag : 100000 + lag].astype(float))[0, 1] > 0.8
    assert np.corrcoef(a, b)[0, 1] < 1.0  # lossy, as Opus is


# Opus has no checksum: random bytes behind a valid first (TOC) byte decode as noise. These are
# structurally invalid (bad frame counts or lengths), which libopus does reject.
@pytest.mark.parametrize("packet", [b"", b"\x01\x02 this is not opus at all", b"\x03\x00", b"\x03\xff" + b"x" * 10])
def test_garbage_is_a_format_error_and_the_decoder_survives(packet, two_utterances):
    decoder = OpusDecoder()
    with pytest.raises(AudioFormatError):
        decoder.decode(packet)
    assert len(decoder.decode(encode_pcm(two_utterances[:960])[0])) > 0

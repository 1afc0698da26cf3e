"""The OpenAI Realtime API, transcription sessions, at `/v1/realtime` (`?intent=transcription`): the
client events (events.py: pure), then the session's audio, rendering and connection (connection.py).
The contract voice-agent frameworks speak to a speech-to-text service; OpenAI's own SDK
(`client.realtime.connect`) drives it unchanged.

Client -> server (JSON text frames; every event may carry an `event_id`)
  session.update                 {"session": {"type": "transcription", "audio": {"input": {
                                    "format": {"type": "audio/pcm", "rate": 24000} | {"type": "audio/pcmu|pcma"},
                                    "transcription": {"model", "language", "prompt", "keywords"},
                                    "turn_detection": {"type": "server_vad", "silence_duration_ms", ...} | null}}}}
  transcription_session.update   the beta shape: {"session": {"input_audio_format": "pcm16"|"g711_ulaw"|"g711_alaw",
                                    "input_audio_transcription": {...}, "turn_detection": {...} | null}}
  input_audio_buffer.append      {"audio": <base64>}  PCM16 24 kHz mono little-endian, or G.711 at 8 kHz
  input_audio_buffer.commit      ends the utterance now (the only way with turn_detection null)
  input_audio_buffer.clear       drops the audio not yet committed
Only the fields present in an update change; prompt (comma-separated phrases) and keywords are the
session's hotwords; `include: ["item.input_audio_transcription.logprobs"]` adds `logprobs` (one per
word) to deltas and .completed; others we do not use (noise_reduction) are accepted and ignored.

Server -> client, each with a unique `event_id`
  session.created (on connect) / session.updated / transcription_session.updated: the effective session
  input_audio_buffer.speech_started {audio_start_ms, item_id}   server_vad only: fsmn-vad heard speech
  input_audio_buffer.speech_stopped {audio_end_ms, item_id}
  input_audio_buffer.committed {item_id, previous_item_id}       one per utterance (VAD end or commit)
  conversation.item.input_audio_transcription.delta {item_id, content_index, delta[, logprobs]}   while speaking
  conversation.item.input_audio_transcription.completed {item_id, content_index, transcript, usage,
      speech_serve: {...}}   our extra fields in one object (see `render_completed`)
  conversation.item.input_audio_transcription.failed {item_id, content_index, error}
  input_audio_buffer.cleared
  error {error: {type, code, message, param, event_id}}   the session goes on (up to max_protocol_errors)
Times are milliseconds of the session's audio (16 kHz after resampling), from its first append.
"""

from speech_serve.ingress.protocols.realtime.connection import RealtimeConnection

__all__ = ["RealtimeConnection"]

"""SHIM of xiaozhi-esp32-server's core/handle/receiveAudioHandle.py: the two functions the vendored ASR
base class imports, cut to their ASR path. Upstream, handleAudioMessage also handles wake-up grace,
server-side AEC barge-in and the idle goodbye; startToChat parses the speaker JSON, checks binding and
output limits, runs intents, sends `stt` to the device and starts the LLM. Those pull in the whole
server (LLM, TTS, intent and MCP handlers)."""


async def handleAudioMessage(conn, pcm_frame):
    # 当前片段是否有人说话 (as upstream: the connection's VAD, then the ASR provider's receive_audio)
    try:
        have_voice = conn.vad.is_vad(conn, pcm_frame)
        await conn.asr.receive_audio(conn, pcm_frame, have_voice)
    finally:
        conn.frames_handled += 1  # the shim's own: lets a test know every queued frame went through


async def startToChat(conn, text):
    # Upstream: send_stt_message(conn, text), then conn.chat(text) (the LLM). Here: what the device
    # would be shown as its `stt`, and the LLM asked.
    conn.chat_inputs.append(text)

"""SHIM of xiaozhi-esp32-server's core/handle/reportHandle.py: `enqueue_asr_report` as it behaves with
the manager's chat-history setting 2 (report text and audio), minus the checks on the manager API
config. Upstream it imports the manager API client and the TTS/opus helpers."""

import time


def enqueue_asr_report(conn, text, opus_data):
    conn.report_queue.put((1, text, opus_data, int(time.time() * 1000)))

"""Run by test_gpu_placement.py in its own process: a fresh local Ray node that declares one
GPU (on a CPU-only machine), the app builder's application with SenseVoice at 0.25 GPU and 5
replicas. Prints RESULT <json> with the replica states once four are running."""

import json
import sys
import threading
import time

import ray
from ray import serve

from speech_serve.app import build_app

args, port = json.loads(sys.argv[1]), int(sys.argv[2])
ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": port})
# serve.run waits for every replica; the fifth can never be placed, so it runs in a thread.
threading.Thread(target=lambda: serve.run(build_app(args), name="gpu", route_prefix="/"), daemon=True).start()


def states() -> dict:
    try:
        deployments = serve.status().applications["gpu"].deployments
    except KeyError:
        return {}
    return {name: dict(d.replica_states) for name, d in deployments.items()}


def settled() -> bool:
    """Four SenseVoice replicas running and the Speaker beside them. The fifth cannot be placed
    once four hold the whole GPU (gpu_available 0 in the result), so nothing needs waiting for."""
    now = states()
    return now.get("SenseVoice", {}).get("RUNNING", 0) >= 4 and now.get("Speaker", {}).get("RUNNING", 0) >= 1


deadline = time.monotonic() + 240
while time.monotonic() < deadline and not settled():
    time.sleep(1)
result = {"replicas": states(), "gpu_available": ray.available_resources().get("GPU", 0.0)}
print("RESULT " + json.dumps(result), flush=True)
serve.shutdown()
ray.shutdown()

"""`logging.encoding: JSON` (config/production.yaml) on a real Serve: every deployment's replica log is JSON
lines, and the internal deployments keep their access log off (speech_serve/settings/logs.py, app.py).

Its own Ray in a child process: the shared service of the other integration tests logs TEXT."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
TIMEOUT_S = 600
CHILD = """
import glob, json, os, sys, time
import httpx, ray
from ray import serve
from speech_serve.app import free_port, run_local
from tests.support.service import wait_healthy
base = run_local(json.loads(sys.argv[1]), free_port(), name="jsonlogs", num_cpus=2)
wait_healthy(f"http://{base}/healthz")
httpx.get(f"http://{base}/healthz", timeout=30)  # one more request: an Ingress access-log line
time.sleep(2)
logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
found = {}
for name in ("Ingress", "VADHost", "SenseVoice"):
    lines = []
    for path in glob.glob(os.path.join(logs, f"replica_jsonlogs_{name}_*.log")):
        lines += [line for line in open(path) if line.strip()]
    found[name] = lines
print("RESULT " + json.dumps(found))
serve.shutdown()
ray.shutdown()
"""


def test_json_logs_in_every_deployment_with_the_internal_access_log_still_off(service_args):
    args = {**service_args, "logging": {"encoding": "JSON"}}
    args["security"] = {**args["security"], "device_auth": "off"}  # no secret in this child's environment
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                            timeout=TIMEOUT_S, cwd=ROOT, env=env)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    found = json.loads(lines[0].removeprefix("RESULT "))
    for name, log_lines in found.items():
        assert log_lines, f"no {name} replica log"
        records = [json.loads(line) for line in log_lines]  # every line is a JSON object
        assert all("message" in r for r in records), name
    ingress = [json.loads(line) for line in found["Ingress"]]
    assert any("/healthz" in r["message"] for r in ingress)  # the Ingress keeps its access log
    vad = [json.loads(line) for line in found["VADHost"]]
    assert not any(r.get("request_id") and r["message"].split()[:1] in (["CALL"], ["GET"]) for r in vad)

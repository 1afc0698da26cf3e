import pytest

from speech_serve.cli.scale import ScaleError, deploy_body, rescale

STATUS = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "0.0.0.0", "port": 8000},
    "controller_info": {"node_id": "x"},
    "applications": {
        "speech": {
            "status": "RUNNING",
            "deployed_app_config": {
                "name": "speech", "import_path": "speech_serve.app:build_app", "args": {"asr": {"threads": 2}},
                "deployments": [
                    {"name": "SenseVoice", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                     "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}},
                    {"name": "VADHost", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "policy": {
                        "policy_function": "speech_serve.replicas.vad:SessionsPolicy"}}},
                ],
            },
        }
    },
}  # fmt: skip


def test_deploy_body_is_what_runs_minus_status():
    body = deploy_body(STATUS)
    assert set(body) == {"proxy_location", "http_options", "applications"}
    assert body["applications"][0]["args"] == {"asr": {"threads": 2}}


def test_rescale_changes_only_what_was_asked():
    body = deploy_body(STATUS)
    out = rescale(body, "speech", "SenseVoice", min_replicas=2, max_replicas=8, batch_size=16)
    sv = out["applications"][0]["deployments"][0]
    assert sv["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8}
    assert sv["user_config"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}
    assert body["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] == 1  # a copy
    vad_app = rescale(body, "speech", "VADHost", sessions_per_replica=100)["applications"][0]
    assert vad_app["args"]["vad"] == {"sessions_per_replica": 100}  # lanes and policy from one setting
    assert vad_app["deployments"][1] == body["applications"][0]["deployments"][1]
    new = rescale(body, "speech", "Ingress", max_replicas=6)["applications"][0]["deployments"][2]
    assert new == {"name": "Ingress", "autoscaling_config": {"max_replicas": 6}}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"app": "nope", "deployment": "SenseVoice"}, "no application"),
        ({"app": "speech", "deployment": "SenseVoice", "min_replicas": 5}, "min_replicas 5 > max_replicas 4"),
        ({"app": "speech", "deployment": "SenseVoice", "sessions_per_replica": 9}, "does not scale on sessions"),
    ],
)
def test_bad_changes_are_refused(kwargs, message):
    with pytest.raises(ScaleError, match=message):
        rescale(deploy_body(STATUS), **kwargs)


def test_imperatively_deployed_apps_cannot_be_rescaled():
    with pytest.raises(ScaleError, match="serve deploy"):
        deploy_body({"applications": {"speech": {"deployed_app_config": None}}})

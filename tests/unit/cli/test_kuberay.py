"""deploy/kuberay/rayservice.yaml: generated from config/serve.yaml, valid without a cluster.

No Kubernetes and no Ray cluster here: the manifest is checked against the vendored KubeRay CRD
schema plus the Kubernetes schemas kubernetes-validate ships, its serveConfigV2 against Ray Serve's
own config schema and our settings, and the generator's placement arithmetic against hand counts."""

import copy

import pytest
import yaml
from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema

from speech_serve.cli import kuberay
from speech_serve.settings import AppSettings


@pytest.fixture(scope="module")
def committed() -> dict:
    return yaml.safe_load(kuberay.MANIFEST.read_text())


def _needs(**overrides):
    config = kuberay.serve_config()
    args = config["applications"][0]["args"]
    for name, placement in overrides.items():
        args["placement"][name] = placement
    return kuberay.replica_needs(config)


def test_the_committed_manifest_is_what_the_generator_gives_now():
    assert kuberay.MANIFEST.read_text() == kuberay.render(), (
        f"deploy/kuberay/rayservice.yaml is stale (config/serve.yaml or deploy/kuberay/*.yaml changed): "
        f"run `{kuberay.REGENERATE}` and commit the result"
    )


def test_a_changed_serve_config_makes_a_different_manifest(tmp_path):
    """The equality above can fail: a new value in config/serve.yaml reaches serveConfigV2."""
    overlay = yaml.safe_load(kuberay.OVERLAY.read_text())
    overlay["base"] = str(kuberay.ROOT / "config" / "serve.yaml")
    overlay["applications"][0]["args"]["vad"] = {"max_end_silence_ms": 777}
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    text = kuberay.render(overlay=path)
    assert text != kuberay.MANIFEST.read_text() and "max_end_silence_ms: 777" in text


def test_the_check_command_names_the_command_to_run(monkeypatch, tmp_path, capsys):
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(kuberay.MANIFEST.read_text().replace("maxReplicas: 4", "maxReplicas: 3", 1))
    monkeypatch.setattr(kuberay, "MANIFEST", stale)
    monkeypatch.setattr(kuberay, "ROOT", tmp_path)
    assert kuberay.main(["--check"]) == 1
    assert "make kuberay" in capsys.readouterr().err
    stale.write_text(kuberay.render())
    assert kuberay.main(["--check"]) == 0


def test_serve_config_is_a_valid_ray_serve_config_with_every_deployment(committed):
    text = committed["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config == ServeDeploySchema.model_validate(kuberay.serve_config())  # the overlay merged, nothing else
    (app,) = config.applications
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "VADHost", "SenseVoice", "Speaker", "SessionRegistry"}
    registry = deployments["SessionRegistry"].ray_actor_options  # pinned to the head, still no CPU
    assert (registry.num_cpus, registry.resources) == (0, {"node:__internal_head__": 0.001})
    settings = AppSettings(**app.args)  # our own settings accept the args (unknown keys would fail)
    assert settings.use_gpus == "always" and settings.models.require_real_models
    for placement in settings.placement.values():  # what the builder hands Ray per replica
        RayActorOptionsSchema.model_validate(placement.actor_options(cluster_has_gpu=True))
    assert settings.placement["SenseVoice"].num_gpus == 0.25 and settings.placement["Speaker"].num_gpus == 0.15
    assert config.http_options.host == "0.0.0.0"


def test_the_manifest_passes_the_schema_check(committed):
    assert kuberay.validate(committed) == []


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("spec", "rayClusterConfig", "enableInTreeAutoScaling"), True, "'enableInTreeAutoScaling' was unexpected"),
        (("spec", "rayClusterConfig", "enableInTreeAutoscaling"), "yes", "is not of type 'boolean'"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "1", "is not of type 'integer'"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resource"), {},
         "'resource' was unexpected"),  # a typo inside the pod template: Kubernetes' own schema
        (("spec", "rayClusterConfig", "autoscalerOptions", "upscalingMode"), "Fast", "is not one of"),
        (("spec", "serveService", "spec", "ports", 0, "port"), "8000", "is not of type 'integer'"),
        (("spec", "serveConfigV2"), {"applications": []}, "is not of type 'string'"),
    ],
)  # fmt: skip
def test_the_schema_check_rejects_misspelled_fields_and_wrong_types(committed, path, value, expected):
    bad = copy.deepcopy(committed)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = kuberay.validate(bad)
    assert errors and any(expected in e for e in errors), errors


def test_a_manifest_without_its_required_parts_is_rejected(committed):
    bad = copy.deepcopy(committed)
    del bad["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in e for e in kuberay.validate(bad))
    bad = copy.deepcopy(committed)
    del bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    assert kuberay.validate(bad) == []  # an image is optional to the schema (a defaulting webhook may set it) ...
    bad["kind"] = "RayCluster"
    assert any("'RayService' was expected" in e for e in kuberay.validate(bad))  # ... the kind is not


def test_groups_fractional_gpus_and_the_autoscaler(committed):
    cluster = committed["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == kuberay.ray_version() == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    cpu, gpu = groups["cpu"], groups["gpu"]
    gpu_limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in str(cpu)
    assert cpu["rayStartParams"]["resources"] == '"{\\"speech_cpu\\": 100}"'
    # Hand counts: CPU pods (4 CPUs) hold 2 of each 1-CPU replica at the minimum -> 1 pod; 8 + 8 -> 4.
    # GPU pods (1 GPU, 8 CPUs): 1 SenseVoice (0.25) + 1 Speaker (0.15) -> 1; at the maximum 8 x 0.25
    # fill 2 pods, 8 x 0.15 fill 6 on a third and 2 on a fourth -> 4.
    assert (cpu["minReplicas"], cpu["maxReplicas"], cpu["replicas"]) == (1, 4, 1)
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["replicas"]) == (1, 4, 1)
    for group in (cpu, gpu):
        (container,) = group["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        command = probe["exec"]["command"][-1]  # the proxy's own health, then the app's through it
        assert "http://localhost:8000/-/healthz | grep -q success &&" in command
        assert command.endswith("-T 6 -q -O /dev/null http://localhost:8000/healthz")  # healthz_timeout_s 5 + 1
        assert probe["timeoutSeconds"] == 9 and probe["failureThreshold"] == 3
        assert {"name": "MODELSCOPE_CACHE", "value": "/models"} in container["env"]
    service = committed["spec"]["serveService"]
    assert service["spec"] == {"type": "ClusterIP", "ports": [{"name": "serve", "port": 8000}]}
    assert committed["spec"]["excludeHeadPodFromServeSvc"] is True
    assert committed["spec"]["rayClusterDeletionDelaySeconds"] == 600  # Ingress graceful_shutdown_timeout_s


def test_the_cluster_is_not_open_to_any_pod_and_keeps_what_it_cannot_do_off():
    """The audit: no Ray auth token (Ray 2.60 turns it on for local clusters only: any pod reaching the
    dashboard could submit a job and read the secrets); Kubernetes' 30 s grace cut the sessions a
    stopping Ingress drains for 600 s; enrolments into per-pod SQLite answered 201 and reached no
    other pod (now the store is a PostgreSQL every pod shares, its URL from the Secret); the device
    Service (admin API, tokens, plaintext) was a public LoadBalancer."""
    committed = yaml.safe_load(kuberay.MANIFEST.read_text())
    assert committed["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    for group in committed["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] == 600 + kuberay.POD_EXIT_S
    app = yaml.safe_load(committed["spec"]["serveConfigV2"])["applications"][0]
    voiceprints = AppSettings(**app["args"]).voiceprints
    assert voiceprints.enrolment is True and voiceprints.store == "env:SPEECH_SERVE_VOICEPRINT_STORE"
    secret = {"secretKeyRef": {"name": "speech-serve-secrets", "key": "voiceprint-store"}}
    from_secret = {"name": "SPEECH_SERVE_VOICEPRINT_STORE", "valueFrom": secret}
    cluster = committed["spec"]["rayClusterConfig"]
    for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert from_secret in spec["template"]["spec"]["containers"][0]["env"]  # required: no optional
    assert committed["spec"]["serveService"]["spec"]["type"] == "ClusterIP"


def test_the_image_runs_the_ray_version_the_cluster_declares():
    dockerfile = (kuberay.KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{kuberay.ray_version()}-py311\n" in dockerfile  # a mismatch breaks the autoscaler


def test_packing_counts_pods_first_fit():
    pod = {"CPU": 8.0, "GPU": 1.0}
    assert kuberay.pods_for([{"CPU": 1, "GPU": 0.25}] * 4, pod) == 1
    assert kuberay.pods_for([{"CPU": 1, "GPU": 0.25}] * 5, pod) == 2
    assert kuberay.pods_for([{"CPU": 1, "GPU": 0.15}] * 6 + [{"CPU": 1, "GPU": 0.25}], pod) == 2  # 1.15 GPUs
    assert kuberay.pods_for([{"CPU": 1, "GPU": 0.15}] * 5 + [{"CPU": 1, "GPU": 0.25}], pod) == 1  # 1.0 exactly
    assert kuberay.pods_for([{"CPU": 3, "GPU": 0.1}] * 3, pod) == 2  # CPUs run out first
    assert kuberay.pods_for([], pod) == 0


def test_a_deployment_that_could_land_on_the_wrong_group_is_refused():
    cluster = yaml.safe_load(kuberay.CLUSTER.read_text())
    kuberay.check_groups(_needs(), cluster["groups"])  # as committed: each on its own group only
    with pytest.raises(kuberay.GenerateError, match=r"Ingress .* fits the groups \['cpu', 'gpu'\]"):
        kuberay.check_groups(_needs(Ingress={"num_cpus": 1}), cluster["groups"])  # no custom resource
    with pytest.raises(kuberay.GenerateError, match=r"SenseVoice .* fits the groups \[\]"):
        kuberay.check_groups(_needs(SenseVoice={"num_cpus": 16, "num_gpus": 0.25}), cluster["groups"])


def test_cluster_settings_the_builder_cannot_use_are_refused():
    config = kuberay.serve_config()
    config["applications"][0]["args"]["use_gpus"] = "auto"
    with pytest.raises(kuberay.GenerateError, match="use_gpus: always"):
        kuberay.replica_needs(config)
    with pytest.raises(kuberay.GenerateError, match="num_cpus must be a number"):
        _needs(Speaker={"num_cpus": None, "num_gpus": 0.15})


def test_every_pod_gets_ray_serves_own_settings_from_serve_env(committed, tmp_path):
    """config/serve.env is what `make serve` exports too (Makefile SERVE_ENV)."""
    expected = kuberay.serve_env()
    assert {e["name"] for e in expected} >= {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S"}
    specs = [committed["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in committed["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for spec in specs:
        env = spec["containers"][0]["env"]
        assert all(e in env for e in expected)
    other = tmp_path / "serve.env"
    other.write_text("# a comment\n\nA=1\nB = two=2\n")
    assert kuberay.serve_env(other) == [{"name": "A", "value": "1"}, {"name": "B", "value": "two=2"}]


@pytest.mark.parametrize(
    "voiceprints, error",
    [
        ({"store": "sqlite:///~/vp.sqlite3"}, "a file on each pod"),  # enrolment on by default
        ({"store": "postgresql://svc:s3cret@db/voices"}, "holds a password"),
        ({"store": "postgresql://db/voices?password=s3cret"}, "holds a password"),
        ({"store": "sqlite:///~/vp.sqlite3", "enrolment": False}, None),  # per pod, and says so (501)
        ({"store": "postgresql://svc@db/voices"}, None),  # a password from PGPASSWORD or a .pgpass file
    ],
)  # fmt: skip
def test_enrolment_needs_a_store_every_pod_shares_and_no_password_in_the_config(voiceprints, error):
    settings = AppSettings(voiceprints=voiceprints)
    if error is None:
        assert kuberay.store_env(settings) is None
        return
    with pytest.raises(kuberay.GenerateError, match=error) as err:
        kuberay.store_env(settings)
    assert "s3cret" not in str(err.value)

"""The shipped Grafana dashboard charts exactly our metrics (and Ray's replica gauge).
The integration test tests/integration/test_scaling.py scrapes a live node for the same names."""

import json
import re
from pathlib import Path

from speech_serve.ingress.metrics import DEFINED as INGRESS_METRICS
from speech_serve.replicas.metrics import DEFINED as REPLICA_METRICS

DEFINED = {**INGRESS_METRICS, **REPLICA_METRICS}  # every metric we export, from either side

DASHBOARD = Path(__file__).parents[2] / "config" / "grafana" / "speech-serve.json"
RAY_BUILTIN = {"ray_serve_deployment_replica_healthy"}


def dashboard_series() -> set[str]:
    """Every Prometheus series name a panel queries."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {name for e in exprs for name in re.findall(r"\bray_[a-z_]+", e)}


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", series.removeprefix("ray_"))


def test_every_queried_series_is_one_we_export():
    unknown = {s for s in dashboard_series() - RAY_BUILTIN if base_name(s) not in DEFINED}
    assert not unknown, f"dashboard queries metrics nobody defines: {unknown}"


def test_every_metric_we_export_is_charted():
    charted = {base_name(s) for s in dashboard_series()}
    assert set(DEFINED) <= charted, f"not charted: {set(DEFINED) - charted}"


def test_panels_are_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "speech-serve"
    for panel in dash["panels"]:
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]

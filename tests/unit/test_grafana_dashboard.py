"""The shipped Grafana dashboard charts exactly our metrics (and Ray's replica gauge).
The integration test tests/integration/test_scaling.py scrapes a live node for the same names."""

import json

from speech_serve.ingress.metrics import DEFINED as INGRESS_METRICS
from speech_serve.replicas.metrics import DEFINED as REPLICA_METRICS
from tests.support.dashboard import DASHBOARD, RAY_BUILTIN, base_name, dashboard_series

DEFINED = {**INGRESS_METRICS, **REPLICA_METRICS}  # every metric we export, from either side

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

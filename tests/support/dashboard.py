"""The shipped Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).parents[2] / "config" / "grafana" / "speech-serve.json"
RAY_BUILTIN = {"ray_serve_deployment_replica_healthy"}


def dashboard_series() -> set[str]:
    """Every Prometheus series name a panel queries."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {name for e in exprs for name in re.findall(r"\bray_[a-z_]+", e)}


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", series.removeprefix("ray_"))

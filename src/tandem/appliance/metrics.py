"""``/metrics``: Prometheus metrics read from the catalog at scrape time.

Invariants
- Each app object has its own ``CollectorRegistry`` (two appliances in one process, as in
  tests, never share or clash), and nothing is counted in memory: the catalog is the truth,
  so the numbers survive restarts and agree with the API.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from tandem.catalog.db import Catalog
from tandem.catalog.models import App, Job
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppState


class CatalogCollector(Collector):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("tandem_jobs", "Jobs by status.", labels=["status"])
        apps = GaugeMetricFamily(
            "tandem_apps", "Applications by lifecycle state.", labels=["state"]
        )
        last = GaugeMetricFamily(
            "tandem_app_last_capture_timestamp_seconds",
            "Unix time of each application's newest snapshot.",
            labels=["app"],
        )
        lag = GaugeMetricFamily(
            "tandem_app_replication_lag_seconds",
            "Age of each mirrored application's newest snapshot held by the peer (achieved RPO).",
            labels=["app"],
        )
        with self.catalog.read() as session:
            replicated = list(session.execute(select(App.name, App.last_replicated)))
            jobs_by = session.execute(select(Job.status, func.count()).group_by(Job.status))
            by_status = {status: count for status, count in jobs_by}
            apps_by = session.execute(select(App.state, func.count()).group_by(App.state))
            by_state = {state: count for state, count in apps_by}
            captures = [
                (name, ts)
                for name, ts in session.execute(
                    select(App.name, App.last_capture).order_by(App.name)
                )
            ]
        for status in JobStatus:
            jobs.add_metric([status.value], float(by_status.get(status, 0)))
        for state in AppState:
            apps.add_metric([state.value], float(by_state.get(state, 0)))
        for name, ts in captures:
            if ts is not None:
                last.add_metric([name], ts.timestamp())
        now = time.time()
        for name, ts in replicated:
            if ts is not None:
                lag.add_metric([name], max(0.0, now - ts.timestamp()))
        yield jobs
        yield apps
        yield last
        yield lag


def make_registry(catalog: Catalog) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(catalog))
    return registry

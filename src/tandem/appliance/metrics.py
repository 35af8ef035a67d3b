"""``/metrics``: Prometheus metrics read from the catalog at scrape time.

Invariants
- Each app object has its own ``CollectorRegistry`` (two appliances in one process, as in
  tests, never share or clash), and nothing is counted in memory: the catalog is the truth,
  so the numbers survive restarts and agree with the API.
- ``tandem_app_rpo_seconds`` and ``tandem_app_at_risk`` are ``operations.apps.risk_of``,
  the very rule ``tandem apps`` and the console show, for every app protected by a template
  (an app with no recovery point yet has no RPO sample, but may be at risk).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from tandem.catalog import queries as q
from tandem.catalog.db import Catalog
from tandem.catalog.models import App, Job
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppState
from tandem.operations.apps import risk_of, wal_points


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
        rpo = GaugeMetricFamily(
            "tandem_app_rpo_seconds",
            "Achieved RPO of each protected application: the age of its newest snapshot, or "
            "for a mirrored template of its newest replica at the peer.",
            labels=["app"],
        )
        at_risk = GaugeMetricFamily(
            "tandem_app_at_risk",
            "1 when an application's achieved RPO passed its template's --max-lag, else 0.",
            labels=["app"],
        )
        with self.catalog.read() as session:
            templates = {t.name: t for t in q.list_templates(session)}
            protected = [a for a in q.list_apps(session) if a.template in templates]
            peers = q.list_peers(session)
            points = wal_points(session, protected, templates)
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
        peer = peers[0].name if peers else None
        at = datetime.fromtimestamp(now, UTC)
        for app in protected:
            risk = risk_of(app, templates[app.template or ""], at, peer, points.get(app.name))
            if risk.rpo_seconds is not None:
                rpo.add_metric([app.name], risk.rpo_seconds)
            at_risk.add_metric([app.name], 1.0 if risk.at_risk else 0.0)
        yield jobs
        yield apps
        yield last
        yield lag
        yield rpo
        yield at_risk


def make_registry(catalog: Catalog) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(catalog))
    return registry

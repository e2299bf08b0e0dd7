"""Custom Prometheus metrics of the ingress (exported on the Ray metrics port with a `ray_` prefix).

Serve adds `deployment`, `replica` and `application` tags. Next to Serve's own per-deployment metrics these
give the end-to-end search latency and how often answers were degraded, per failed component.
"""

from __future__ import annotations

_LATENCY_BOUNDARIES_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class SearchMetrics:
    """geoloc_search_latency_ms (histogram), geoloc_search_requests_total{outcome},
    geoloc_component_failures_total{component}."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.latency = metrics.Histogram(
            "geoloc_search_latency_ms", description="POST /search latency inside the ingress (ms)",
            boundaries=_LATENCY_BOUNDARIES_MS, tag_keys=("outcome",))
        self.requests = metrics.Counter(
            "geoloc_search_requests_total",
            description="POST /search answers by outcome: ok, degraded, invalid, unauthorized, unavailable",
            tag_keys=("outcome",))
        self.failures = metrics.Counter(
            "geoloc_component_failures_total",
            description="experts / index shards that did not answer a search (the answer was degraded)",
            tag_keys=("component",))

    def answered(self, outcome: str, took_ms: float | None = None) -> None:
        self.requests.inc(tags={"outcome": outcome})
        if took_ms is not None:
            self.latency.observe(took_ms, tags={"outcome": outcome})

    def component_failed(self, component: str) -> None:
        self.failures.inc(tags={"component": component})


class NoMetrics:
    """Stand-in outside a Serve replica (e.g. the FastAPI app under a plain test client)."""

    def answered(self, outcome: str, took_ms: float | None = None) -> None:
        pass

    def component_failed(self, component: str) -> None:
        pass

"""Prometheus metrics of one app (its own registry: two apps in one process never share counters).

Names follow vLLM's with the ``opt:`` prefix, so existing dashboards need only a prefix change:
``opt:request_success_total``, ``opt:prompt_tokens_total``, ``opt:generation_tokens_total``,
``opt:time_to_first_token_seconds``, ``opt:inter_token_latency_seconds``,
``opt:e2e_request_latency_seconds``, ``opt:num_requests_running``, ``opt:num_requests_waiting``,
``opt:spec_decode_num_draft_tokens_total``, ``opt:spec_decode_num_accepted_tokens_total``;
plus ``opt:http_requests_total`` by route and status and ``opt:model_loaded``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from openpto.core.steps import StepRecord
from openpto.engines.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets from vLLM's: CPU serving of small models lives in the 1 ms - 10 s range.
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
         10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineCollector(Collector):
    """Reads the engine's gauges and speculative counters at scrape time."""

    def __init__(self, model: str, stats: Callable[[], EngineStats], ready: Callable[[], bool]):
        self.model = model
        self.stats = stats
        self.ready = ready

    def collect(self) -> Iterator[Any]:
        stats = self.stats()
        labels = ["model_name"]
        for name, doc, value in (
            ("opt:num_requests_running", "Requests in the running batch.", stats.running),
            ("opt:num_requests_waiting", "Requests waiting for a batch slot.", stats.waiting),
            ("opt:model_loaded", "1 once the model is loaded.", int(self.ready())),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric([self.model], value)
            yield gauge
        for name, doc, value in (
            ("opt:spec_decode_num_draft_tokens", "Draft tokens proposed.", stats.draft_tokens),
            ("opt:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
             stats.accepted_tokens),
        ):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric([self.model], value)
            yield counter


class ServerMetrics:
    def __init__(self, model: str, stats: Callable[[], EngineStats],
                 ready: Callable[[], bool]) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["model_name"]
        self.http_requests = Counter("opt:http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=r)
        self.request_success = Counter("opt:request_success", "Finished generation requests.",
                                       ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("opt:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r)
        self.generation_tokens = Counter("opt:generation_tokens", "Tokens generated.", labels,
                                         registry=r)
        self.ttft = Histogram("opt:time_to_first_token_seconds",
                              "Arrival to first generated token.", labels, buckets=_TTFT,
                              registry=r)
        self.itl = Histogram("opt:inter_token_latency_seconds",
                             "Time between consecutive generated tokens.", labels, buckets=_ITL,
                             registry=r)
        self.e2e = Histogram("opt:e2e_request_latency_seconds",
                             "Arrival to the last token.", labels, buckets=_E2E, registry=r)
        r.register(_EngineCollector(model, stats, ready))

    def observe_finished(self, last: StepRecord, generated: int, gaps: list[float]) -> None:
        """Record one finished sequence from its last record and its inter-token gaps."""
        self.request_success.labels(self.model, last.finish_reason or "unknown").inc()
        self.prompt_tokens.labels(self.model).inc(last.prompt_tokens)
        self.generation_tokens.labels(self.model).inc(generated)
        if last.generated:
            self.ttft.labels(self.model).observe(last.queued_s + last.ttft_s)
        itl = self.itl.labels(self.model)
        for gap in gaps:
            itl.observe(gap)
        self.e2e.labels(self.model).observe(last.total_seconds)

    def totals(self) -> dict[str, float]:
        """Finished requests and token counts so far (what ``opt serve`` records at exit)."""
        def total(counter: Counter) -> float:
            return sum(s.value for m in counter.collect() for s in m.samples
                       if s.name.endswith("_total"))

        return {"requests": total(self.request_success),
                "prompt_tokens": total(self.prompt_tokens),
                "generation_tokens": total(self.generation_tokens)}

    def observe_http(self, method: str, route: str, status: int) -> None:
        self.http_requests.labels(method, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one server, served at ``GET /metrics`` (see ``docs/operations.md``).

Each server has its own ``CollectorRegistry`` (several servers in one process never share
counters). Counters and histograms are updated where the work happens (HTTP middleware, the
request handler, the run and sampler modules); gauges that describe the present (queue depth,
loaded runs, adapter tiers) are read from the engines at scrape time by :class:`_StateCollector`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tinker import wire
from tinker.types import ForwardBackwardOutput, SampleResponse

if TYPE_CHECKING:
    from tinker_backend.request_handler import RequestHandler

# Latency buckets from a heartbeat (~1 ms) to a long clock cycle of a big model (minutes).
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's counters and histograms; ``registry`` is what ``/metrics`` serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_seconds = Histogram(
            "tinker_http_request_duration_seconds", "HTTP requests by route, method and status (the _count is the number)",
            ["route", "method", "status"], registry=r, buckets=_SECONDS,
        )
        self.request_seconds = Histogram(
            "tinker_request_duration_seconds", "Requests of the native and Tinker protocols by type and outcome",
            ["type", "outcome"], registry=r, buckets=_SECONDS,
        )
        self.errors = Counter(
            "tinker_errors", "Requests answered with an error, by kind (user, rate_limited, server) and status",
            ["kind", "status"], registry=r,
        )
        self.cycle_seconds = Histogram(
            "tinker_clock_cycle_seconds", "Merged forward/backward pass of one clock cycle, per base model",
            ["base_model"], registry=r, buckets=_SECONDS,
        )
        self.cycle_runs = Histogram(
            "tinker_clock_cycle_runs", "Runs merged into one clock cycle, per base model",
            ["base_model"], registry=r, buckets=_ROWS,
        )
        self.trained_tokens = Counter(
            "tinker_trained_tokens", "Tokens of forward_backward requests, per base model", ["base_model"], registry=r
        )
        self.sampled_tokens = Counter(
            "tinker_sampled_tokens", "Tokens sampled, per base model", ["base_model"], registry=r
        )
        self.optim_steps = Counter("tinker_optim_steps", "optim_step requests answered, per base model", ["base_model"], registry=r)
        self._last_cycle: dict[str, float] = {}  # base model -> the last clock cycle observed

    def answered(self, base_model: str, request: wire.TrainingRequest, result: Any) -> None:
        """Count a training request's successful answer."""
        if isinstance(request, wire.ForwardBackward) and isinstance(result, ForwardBackwardOutput):
            if not request.forward_only:
                self.trained_tokens.labels(base_model).inc(sum(d.model_input.length for d in request.data))
            cycle = result.metrics.get("clock_cycle:unique")
            if cycle is not None and cycle != self._last_cycle.get(base_model):  # once per cycle, not per run
                self._last_cycle[base_model] = cycle
                self.cycle_seconds.labels(base_model).observe(result.metrics.get("cycle_seconds:max", 0.0))
                self.cycle_runs.labels(base_model).observe(result.metrics.get("cycle_runs:max", 0.0))
        elif isinstance(request, wire.OptimStep):
            self.optim_steps.labels(base_model).inc()

    def sampled(self, base_model: str, response: SampleResponse) -> None:
        self.sampled_tokens.labels(base_model).inc(sum(len(s.tokens) for s in response.sequences))

    def request_done(self, request: wire.Request, started: float, error: BaseException | None) -> None:
        """Time one handled request; count its error by kind (``category``, or a 429)."""
        outcome = "ok"
        if error is not None:
            status = int(getattr(error, "status", 500))
            category = "rate_limited" if status == 429 else str(getattr(error, "category", "server"))
            outcome = category
            self.errors.labels(category, str(status)).inc()
        self.request_seconds.labels(type(request).__name__, outcome).observe(time.perf_counter() - started)

    def watch(self, backend: RequestHandler) -> None:
        """Read the live state of ``backend`` at every scrape."""
        self.registry.register(_StateCollector(backend))


class _StateCollector(Collector):
    """Gauges and engine counters read at scrape time (nothing to keep up to date)."""

    def __init__(self, backend: RequestHandler) -> None:
        self.backend = backend

    def collect(self) -> Iterable[Metric]:
        queue = GaugeMetricFamily("tinker_queue_depth", "Training requests waiting in the run queues", labels=["base_model"])
        runs = GaugeMetricFamily("tinker_runs_loaded", "Training runs loaded in an engine", labels=["base_model"])
        tiers = GaugeMetricFamily(
            "tinker_adapters", "Training adapters by where they are (slots, host, disk)", labels=["base_model", "tier"]
        )
        slots = CounterMetricFamily(
            "tinker_adapter_slot", "Adapter slot lookups of merged passes: hit, miss (brought back), offload (moved out)",
            labels=["base_model", "event"],
        )
        rows = CounterMetricFamily(
            "tinker_sampler_decode_rows", "Rows decoded by the torch sampler (over decode_steps: the mean batch size)",
            labels=["base_model"],
        )
        steps = CounterMetricFamily("tinker_sampler_decode_steps", "Decode steps of the torch sampler", labels=["base_model"])
        for scheduler in self.backend.engines.schedulers():
            model = scheduler.base_model
            queue.add_metric([model], scheduler.queue_depth())
            runs.add_metric([model], scheduler.run_count())
            engine = scheduler.loaded_engine()
            stats = _engine_stats(engine)
            for tier, count in stats.get("tiers", {}).items():
                tiers.add_metric([model, tier], count)
            for event, count in stats.get("slot_events", {}).items():
                slots.add_metric([model, event], count)
            if "decode_steps" in stats:
                steps.add_metric([model], stats["decode_steps"])
                rows.add_metric([model], stats["decoded_rows"])
        sessions = GaugeMetricFamily("tinker_sessions_live", "Sessions with a heartbeat or request within the timeout")
        sessions.add_metric([], self.backend.ledger.live_sessions())
        yield from (queue, runs, tiers, slots, rows, steps, sessions)


def _engine_stats(engine: Any) -> dict[str, Any]:
    """What an in-process engine reports about itself (``ModelEngine.stats``); {} for others."""
    stats = getattr(engine, "stats", None)
    return stats() if callable(stats) else {}


def add_routes(app: web.Application, backend_key: web.AppKey[RequestHandler]) -> None:
    """``GET /metrics`` (the Prometheus text format)."""

    async def scrape(request: web.Request) -> web.Response:
        body = generate_latest(request.app[backend_key].metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", scrape)


def middleware(backend_key: web.AppKey[RequestHandler]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Time every HTTP request by its route pattern (not its path: ids would explode the labels).
    A WebSocket's time is that of its whole connection."""

    @web.middleware
    async def timed(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            metrics = request.app[backend_key].metrics
            metrics.http_seconds.labels(route, request.method, str(status)).observe(time.perf_counter() - started)

    return timed


"""Prometheus metrics of one server: request counts, tokens, latency histograms, and engine state read at scrape.

Each server owns its `CollectorRegistry` (no global state: several servers, e.g. in tests, coexist in one
process). Names follow vLLM's with a `glm5:` prefix, so dashboards port with a rename.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)  # noqa: E501


class _EngineCollector:
    """Gauges read from the engine when Prometheus scrapes (running / waiting requests, cache, MTP)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def describe(self) -> list:
        return []

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        stats = self.engine.stats()
        yield GaugeMetricFamily(
            "glm5:num_requests_running", "Sequences running on the engine.", value=stats["num_running"]
        )
        yield GaugeMetricFamily(
            "glm5:num_requests_waiting", "Sequences waiting to be scheduled.", value=stats["num_waiting"]
        )
        cache = stats["kv_cache"]
        yield GaugeMetricFamily(
            "glm5:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (0-1).",
            value=cache["used_blocks"] / max(cache["num_blocks"], 1),
        )
        yield GaugeMetricFamily(
            "glm5:kv_cache_used_blocks", "KV-cache blocks in use.", value=cache["used_blocks"]
        )
        yield GaugeMetricFamily("glm5:kv_cache_total_blocks", "KV-cache blocks.", value=cache["num_blocks"])
        yield CounterMetricFamily(
            "glm5:num_preemptions",
            "Sequences preempted for lack of cache blocks.",
            value=stats["num_preemptions"],
        )
        spec = stats.get("speculative")
        if spec is not None:
            yield CounterMetricFamily(
                "glm5:spec_decode_num_draft_tokens",
                "MTP draft tokens proposed.",
                value=spec["num_draft_tokens"],
            )
            yield CounterMetricFamily(
                "glm5:spec_decode_num_accepted_tokens",
                "MTP draft tokens accepted.",
                value=spec["num_accepted_tokens"],
            )
            yield GaugeMetricFamily(
                "glm5:spec_decode_acceptance_rate",
                "Accepted / proposed draft tokens.",
                value=spec["acceptance_rate"],
            )
            yield GaugeMetricFamily(
                "glm5:spec_decode_mean_acceptance_length",
                "Tokens per verification step and sequence.",
                value=spec["mean_acceptance_length"],
            )
            per_pos = GaugeMetricFamily(
                "glm5:spec_decode_acceptance_rate_per_pos",
                "Acceptance rate of draft position k.",
                labels=["position"],
            )
            steps = max(spec["num_steps"], 1)
            for k, n in enumerate(spec["accepted_per_position"]):
                per_pos.add_metric([str(k)], n / steps)
            yield per_pos


class ServerMetrics:
    """The server's counters and histograms; `render()` is the /metrics body."""

    def __init__(self, engine: Any) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "glm5:requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.finished = Counter(
            "glm5:request_success",
            "Generation requests finished, by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("glm5:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("glm5:generation_tokens", "Tokens generated.", registry=r)
        self.prefix_queries = Counter(
            "glm5:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "glm5:prefix_cache_hits", "Prompt tokens served from the prefix cache.", registry=r
        )
        self.prefix_hit_rate = Gauge(
            "glm5:prefix_cache_hit_rate", "Prefix-cache hits / queries since start (0-1).", registry=r
        )
        self.rejected = Counter(
            "glm5:requests_rejected", "Requests refused before generation, by reason.", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "glm5:time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "glm5:inter_token_latency_seconds",
            "Time between streamed token deltas.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "glm5:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def record_prompt(self, num_prompt: int, num_cached: int) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.prefix_queries.inc(num_prompt)
        self.prefix_hits.inc(num_cached)
        queries = self.prefix_queries._value.get()
        self.prefix_hit_rate.set(self.prefix_hits._value.get() / queries if queries else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)

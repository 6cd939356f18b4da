"""Prometheus metrics, named after vLLM's (``vllm:`` -> ``servelm:``), on a per-app registry.

The series vLLM also has are exported a second time under vLLM's own name with its ``model_name`` label
(e.g. ``vllm:num_requests_waiting{model_name="..."}``), so vLLM dashboards, autoscalers and routers read
them unchanged. Both names come from the same metric objects: nothing is counted twice.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

disable_created_metrics()  # the *_created series only add noise for a long-running server

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Reads ``engine.stats()`` at scrape time, so gauges are never stale."""

    def __init__(self, engine, server_state):
        self.engine = engine
        self.state = server_state

    def collect(self):
        try:
            s = self.engine.stats()
        except Exception:  # engine not started yet or shutting down: export nothing rather than fail the scrape
            return
        g = GaugeMetricFamily
        yield _gauge(g, "servelm:num_requests_running", "Requests running in the engine.", s.num_running)
        yield _gauge(g, "servelm:num_requests_waiting", "Requests waiting in the engine.", s.num_waiting)
        yield _gauge(g, "servelm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", s.kv_usage)
        yield _gauge(g, "servelm:prefix_cache_hit_rate", "Prefix-cache hits / queries since start.",
                     s.prefix_hit_rate)
        yield CounterMetricFamily("servelm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily("servelm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=s.prefix_cache_hits)
        yield CounterMetricFamily("servelm:num_preemptions", "Requests preempted to free KV-cache blocks.",
                                  value=s.num_preemptions)
        blocks = g("servelm:kv_cache_blocks", "KV-cache blocks by state.", labels=["state"])
        for state in ("total", "used", "cached", "free"):
            blocks.add_metric([state], getattr(s, f"kv_blocks_{state}"))
        yield blocks
        if s.spec_num_accepted_tokens_per_pos:  # speculative decoding is configured
            yield CounterMetricFamily("servelm:spec_decode_num_drafts", "Speculative verifications (one per "
                                      "sequence and step that verified proposals).", value=s.spec_num_drafts)
            yield CounterMetricFamily("servelm:spec_decode_num_draft_tokens", "Proposed tokens verified.",
                                      value=s.spec_num_draft_tokens)
            yield CounterMetricFamily("servelm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                                      value=s.spec_num_accepted_tokens)
            per_pos = CounterMetricFamily("servelm:spec_decode_num_accepted_tokens_per_pos",
                                          "Verifications that accepted the proposal at each position.",
                                          labels=["position"])
            for pos, n in enumerate(s.spec_num_accepted_tokens_per_pos):
                per_pos.add_metric([str(pos)], n)
            yield per_pos
        yield _gauge(g, "servelm:engine_healthy", "1 while the engine step loop is healthy.", int(bool(s.healthy)))
        yield _gauge(g, "servelm:num_requests_server_inflight",
                     "Generation requests admitted by the server and not yet finished.", self.state.inflight)


# servelm:* series that vLLM exports too, and vLLM's name for them
_VLLM_NAMES = {f"servelm:{n}": f"vllm:{n}" for n in (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
    "prefix_cache_hits", "num_preemptions", "time_to_first_token_seconds", "inter_token_latency_seconds",
    "e2e_request_latency_seconds", "request_queue_time_seconds", "prompt_tokens", "generation_tokens",
    "request_success", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens_per_pos")}


class _VllmNames:
    """Re-exports the ``_VLLM_NAMES`` series of ``sources`` (collectors) under vLLM's names, each sample
    with a ``model_name`` label (``model_name()`` at scrape time: the served name)."""

    def __init__(self, sources, model_name):
        self.sources = sources
        self.model_name = model_name

    def collect(self):
        try:
            model = self.model_name()
        except Exception:  # the engine has not loaded yet: no name to label with
            return
        for source in self.sources:
            for family in source.collect():
                name = _VLLM_NAMES.get(family.name)
                if name is None:
                    continue
                m = Metric(name, family.documentation, family.type)
                for smp in family.samples:  # e.g. servelm:prompt_tokens_total -> vllm:prompt_tokens_total
                    m.add_sample(name + smp.name[len(family.name):], {**smp.labels, "model_name": model},
                                 smp.value, smp.timestamp, smp.exemplar)
                yield m


def _gauge(cls, name, doc, value):
    m = cls(name, doc)
    m.add_metric([], float(value))
    return m


class Metrics:
    """All server metrics. ``render()`` returns the Prometheus text exposition."""

    def __init__(self, engine, server_state, model_name=lambda: "unknown"):
        """``model_name()`` returns the served model's name (read at each scrape)."""
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("servelm:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("servelm:inter_token_latency_seconds", "Time between output tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("servelm:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("servelm:request_queue_time_seconds", "Time a request waited in the engine.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("servelm:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("servelm:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("servelm:requests", "HTTP requests by endpoint, status and key (key-<id>).",
                                ["endpoint", "status", "key"], registry=r)
        self.finished = Counter("servelm:request_success", "Finished generations by finish reason.",
                                ["finished_reason"], registry=r)
        self.rate_limited = Counter("servelm:rate_limited_requests", "Requests refused by a rate limit.",
                                    ["key", "limit"], registry=r)
        self.rejected = Counter("servelm:rejected_requests", "Requests refused by backpressure.",
                                ["reason"], registry=r)
        self.embedding_tokens = Counter("servelm:embedding_prompt_tokens", "Tokens embedded.", registry=r)
        engine_collector = _EngineCollector(engine, server_state)
        r.register(engine_collector)
        r.register(_VllmNames([engine_collector, self.ttft, self.itl, self.e2e, self.queue_time, self.prompt_tokens,
                               self.generation_tokens, self.finished], model_name))

    def render(self) -> bytes:
        """Returns the exposition text of every metric."""
        return generate_latest(self.registry)

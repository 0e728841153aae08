"""The gateway's Prometheus metrics, read from each finished response's trace.

One registry per app (not the process-wide default), so several gateways in
one process (tests) do not share counters. Labels are member names, endpoint
paths, status codes and error kinds: never a key, a prompt or a URL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from specfuse.request import FusionResult

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

#: Seconds; fused answers on CPU members take seconds, on GPU clusters tenths.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        # Every metric goes in this app's registry, and both histograms time answers.
        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        def histogram(name: str, documentation: str, *labels: str) -> Histogram:
            return Histogram(name, documentation, labels, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.requests = counter(
            "specfuse_requests", "Requests answered, by endpoint and HTTP status", "endpoint", "status"
        )
        self.in_flight = Gauge("specfuse_requests_in_flight", "Fusions running now", registry=self.registry)
        self.errors = counter("specfuse_errors", "Errors by kind", "kind")
        self.rounds = counter("specfuse_rounds", "Fusion rounds of finished responses")
        self.calls = counter(
            "specfuse_member_calls", "Member calls (draft or score) of finished responses", "member", "kind"
        )
        self.call_errors = counter(
            "specfuse_member_call_errors", "Member calls that failed", "member", "kind"
        )
        self.wins = counter("specfuse_member_wins", "Rounds each member's segment won", "member")
        self.computed = counter(
            "specfuse_member_prompt_tokens_computed",
            "Prompt tokens the member's server computed (not read from its prefix cache), as it reports them",
            "member",
        )
        self.prompt_tokens = counter("specfuse_prompt_tokens", "Usage prompt tokens")
        self.completion_tokens = counter("specfuse_completion_tokens", "Usage completion tokens")
        self.latency = histogram(
            "specfuse_request_duration_seconds",
            "Time from request to the last byte of the answer",
            "endpoint",
            "stream",
        )
        self.first_segment = histogram(
            "specfuse_time_to_first_segment_seconds",
            "Time from the start of the fusion to its first accepted segment",
        )

    def record_result(self, result: FusionResult) -> None:
        trace = result.trace
        self.rounds.inc(len(trace.rounds))
        for record in trace.rounds:
            if record.winner:
                self.wins.labels(record.winner).inc()
            for call in record.calls:
                self.calls.labels(call.member, call.kind).inc()
                if call.error:
                    self.call_errors.labels(call.member, call.kind).inc()
                if call.prompt_tokens_computed:
                    self.computed.labels(call.member).inc(call.prompt_tokens_computed)
        self.prompt_tokens.inc(result.usage.input_tokens)
        self.completion_tokens.inc(result.usage.output_tokens)
        if trace.time_to_first_segment is not None:
            self.first_segment.observe(trace.time_to_first_segment)

    def render(self) -> bytes:
        return generate_latest(self.registry)

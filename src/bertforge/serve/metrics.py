"""Prometheus metrics of the server, through `prometheus_client` (one registry per app).

    bertforge_requests_total{route,method,status}             requests answered
    bertforge_request_duration_seconds{route,method,status}   latency histogram
    bertforge_queue_rows{model} / bertforge_queue_tokens{model}   rows and tokens waiting now
    bertforge_batch_rows{model,kind}                          texts (rows) per batch
    bertforge_batch_tokens{model,kind}                        tokens per batch
    bertforge_batch_requests{model,kind}                      requests sharing a batch
    bertforge_batch_duration_seconds{model,kind}              model time per batch
    bertforge_tokens_total{model,kind}                        tokens processed
    bertforge_rejected_total{model}                           requests refused because the queue was full

`route` is the route's path template (`/v1/embeddings`), or `other` for paths no route serves, so a
scan of random URLs cannot blow up the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
REQUEST_BUCKETS = (1, 2, 3, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's metric families in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bertforge_requests", "HTTP requests answered", ("route", "method", "status"),
                                registry=r)
        self.latency = Histogram("bertforge_request_duration_seconds", "HTTP request latency",
                                 ("route", "method", "status"), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_rows = Gauge("bertforge_queue_rows", "rows waiting for the model", ("model",), registry=r)
        self.queue_tokens = Gauge("bertforge_queue_tokens", "tokens waiting for the model", ("model",), registry=r)
        self.batch_rows = Histogram("bertforge_batch_rows", "texts (rows) per batch", ("model", "kind"),
                                    buckets=ROW_BUCKETS, registry=r)
        self.batch_tokens = Histogram("bertforge_batch_tokens", "tokens per batch", ("model", "kind"),
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_requests = Histogram("bertforge_batch_requests", "requests sharing one batch",
                                        ("model", "kind"), buckets=REQUEST_BUCKETS, registry=r)
        self.batch_seconds = Histogram("bertforge_batch_duration_seconds", "model time per batch",
                                       ("model", "kind"), buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("bertforge_tokens", "tokens processed by the model", ("model", "kind"), registry=r)
        self.rejected = Counter("bertforge_rejected", "requests refused with 503 because the queue was full",
                                ("model",), registry=r)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def observe_batch(self, model: str, kind: str, rows: int, tokens: int, requests: int, seconds: float) -> None:
        self.batch_rows.labels(model, kind).observe(rows)
        self.batch_tokens.labels(model, kind).observe(tokens)
        self.batch_requests.labels(model, kind).observe(requests)
        self.batch_seconds.labels(model, kind).observe(seconds)
        self.tokens.labels(model, kind).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Observability: Prometheus metrics exported by the front end."""

from radixlm.metrics.collector import MetricsCollector

__all__ = ["MetricsCollector"]

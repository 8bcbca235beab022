"""Destinations: Prometheus ``/metrics`` (pull), OTLP (push) and OTLP-JSON files (push)."""

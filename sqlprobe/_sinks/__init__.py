"""Where measurements leave the process: Prometheus (and multiprocess), OpenTelemetry,
the slow-query log.

Sinks receive records and a context fixed at attach, never the probe; they import only
``_core`` (and ``_config``).
"""

"""What sqlprobe works out from the statements: N+1 detection, EXPLAIN plans.

Analyses receive records and a context fixed at attach, never the probe; they import
only ``_core`` (and ``_config``).
"""

"""The core every feature plugs into: records, fingerprints, the collector, containment.

Nothing here imports a hook, a sink, an analysis or the probe (import-linter checks it).
"""

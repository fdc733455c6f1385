"""SQLAlchemy wiring, the hot path: statement, pool and ORM hooks.

Hooks time what SQLAlchemy does and hand small records to the core's collector or to a
pool sink; they import only ``_core`` (and ``_config``).
"""

"""The pytest plugin's implementation (``sqlprobe.pytest_plugin`` is its entry point).

Imported only once a feature of the plugin is on, so a pytest run that uses none of
them never imports SQLAlchemy or prometheus_client through sqlprobe.
"""

__all__: list[str] = []

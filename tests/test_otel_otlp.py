"""Spans leave through the real OTLP/HTTP exporter with the right wire format."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from sqlalchemy import text
from sqlalchemy.engine import Engine

import sqlprobe

pytestmark = pytest.mark.smoke


class Receiver:
    """An OTLP/HTTP trace endpoint on 127.0.0.1 that keeps every decoded request."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                assert self.headers["Content-Type"] == "application/x-protobuf"
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.requests.append(request)
                receiver.paths.append(self.path)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def spans(self) -> list[Span]:
        return [
            span
            for request in self.requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            if ss.scope.name == "sqlprobe"
            for span in ss.spans
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


def test_spans_over_otlp_http(
    pg_engine: Engine, registry: CollectorRegistry, receiver: Receiver, unique: str
) -> None:
    """Spans sent over OTLP/HTTP decode to CLIENT spans with typed semconv attributes and ids."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
    tracer = provider.get_tracer("tests")
    table = f"otlp_{unique}"
    probe = sqlprobe.attach(pg_engine, registry=registry, tracer_provider=provider)
    try:
        with pg_engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)"))
        with tracer.start_as_current_span("request") as parent, pg_engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} VALUES (:i)"), [{"i": 1}, {"i": 2}])
            try:
                with conn.begin_nested():
                    conn.execute(text(f"INSERT INTO {table} VALUES (1)"))
            except Exception:
                pass
        provider.force_flush()
        assert set(receiver.paths) == {"/v1/traces"}
        inserts = [s for s in receiver.spans() if s.name == f"INSERT {table}"]
        assert len(inserts) == 2
        ok, failed = inserts
        parent_ctx = parent.get_span_context()
        assert ok.trace_id == parent_ctx.trace_id.to_bytes(16, "big")
        assert ok.parent_span_id == parent_ctx.span_id.to_bytes(8, "big")
        assert len(ok.span_id) == 8
        assert ok.kind == Span.SpanKind.SPAN_KIND_CLIENT
        assert 0 < ok.end_time_unix_nano - ok.start_time_unix_nano < 10**9
        attrs = _attrs(ok)
        assert attrs["db.system.name"] == "postgresql"
        assert attrs["server.port"] == 5432  # int_value on the wire, not a string
        assert attrs["db.operation.batch.size"] == 2
        assert attrs["db.query.text"] == f"INSERT INTO {table} VALUES (?)"
        assert failed.status.code == Status.StatusCode.STATUS_CODE_ERROR
        assert _attrs(failed)["db.response.status_code"] == "23505"
        assert _attrs(failed)["error.type"] == "IntegrityError"
        # The exemplar on the INSERT bucket names a span that went over the wire.
        exposition = generate_latest(registry).decode()
        exported = {(s.trace_id.hex(), s.span_id.hex()) for s in receiver.spans()}
        linked = [
            (line.split('trace_id="')[1][:32], line.split('span_id="')[1][:16])
            for line in exposition.splitlines()
            if line.startswith("sqlprobe_query_duration_seconds_bucket") and "trace_id" in line
        ]
        assert linked
        assert set(linked) <= exported
    finally:
        with pg_engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        probe.detach()
        provider.shutdown()

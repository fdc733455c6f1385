"""Finished statement spans handed straight to the SDK's span processors.

sqlprobe makes each statement span after the statement has run, with start and end
times already known and attributes prepared once per statement shape. Going through
``Tracer.start_span`` + ``Span.end`` for that costs about 20 µs with the OpenTelemetry
Python SDK, most of it spent building and re-validating a mutable ``Span`` (two locks,
``BoundedAttributes`` re-checking every attribute value) that nobody can observe
before it ends, and then copying it into the ``ReadableSpan`` the processors receive.

When the tracer provider is an SDK one whose configuration makes that mutable phase
unobservable, this module builds the finished ``ReadableSpan`` itself and gives it to
the provider's span processors, doing everything else the SDK does for a span: the
provider's sampler decides (with our attributes, kind and the active context), its id
generator makes the ids, ``RANDOM_TRACE_ID`` and the sampler's trace state are set,
the provider's resource and our instrumentation scope are attached, and a
``RECORD_ONLY`` decision still reaches ``on_end`` unsampled. The exported span is the
same, field by field and on the OTLP wire (``tests/test_otel_fastspan.py`` compares
both paths). It costs about 5 µs.

"Unobservable" is checked, never assumed, because nothing in the SDK's public API says
whether a provider has such a configuration:

* every span processor's ``on_start`` and ``_on_ending`` (or ``on_ending``) are the
  no-op ones of the SDK's ``SpanProcessor``, ``BatchSpanProcessor`` or
  ``SimpleSpanProcessor`` (a processor that looks at or changes spans before they end
  gets real ``Span`` objects);
* the span limits cannot truncate or drop any of our attributes;
* the SDK's own tracer metrics are off, and the tracer is enabled (checked per span:
  the tracer configurator may switch it at run time).

The processor list is re-checked whenever the provider's tuple of processors changes
(``add_span_processor`` replaces it), so a processor added after attach is honoured.
An SDK whose internals differ from what this module expects makes
:func:`direct_emitter` return ``None``, and sqlprobe uses ``start_span`` as before. A
sampler or processor that raises is contained by the caller, as on the SDK route.

This relies on SDK attributes that are not public API (``_span_processors``,
``_span_limits``, ``_tracer_metrics``, ``_instrumentation_scope``, ``_is_enabled``),
which is why it is guarded this way and tested against the installed SDK: the
per-statement saving (about 15 µs) is most of what separates sqlprobe's span cost from
the SDK floor, and no public SDK API makes a span from known times without the
mutable phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["NEEDS_SDK", "direct_emitter"]

#: The most attributes a sqlprobe span carries (with sampler-added ones to spare); span
#: limits below this disable the direct path.
MAX_OUR_ATTRIBUTES = 16

#: Returned by an emitter when a processor added since attach needs real spans.
NEEDS_SDK: Any = object()

#: Emit a finished span: (name, attributes, parent span context or None, start ns,
#: end ns, error?) -> the new span's SpanContext, or None if it was not recorded.
Emit = Callable[[str, Any, Any, int, int, bool], Any]


#: The span-processor hooks that see a span before it ends: each must be the SDK's no-op
#: for the direct route (``on_ending`` is the name the SDK's private ``_on_ending`` is
#: expected to take once the specification's OnEnding is stable).
_EARLY_HOOKS = ("on_start", "_on_ending", "on_ending")


def _noop_hooks() -> dict[str, set[Any]]:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    classes = (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)
    return {
        hook: {cls.__dict__[hook] for cls in classes if hook in cls.__dict__}
        for hook in _EARLY_HOOKS
    }


def _processors_unobservable(processors: Any, noops: dict[str, set[Any]]) -> bool:
    if not isinstance(processors, tuple):
        return False
    for processor in processors:
        cls = type(processor)
        for hook, known in noops.items():
            fn = getattr(cls, hook, None)
            if fn is not None and fn not in known:
                return False
    return True


def direct_emitter(tracer: Any, max_value_length: int) -> Emit | None:
    """An emitter for ``tracer``'s provider, or ``None`` where the SDK path is needed.

    ``max_value_length`` is the longest attribute value sqlprobe sets (span limits that
    would cut it disable the direct path).
    """
    try:
        from opentelemetry.sdk.trace import (
            ReadableSpan,
            SynchronousMultiSpanProcessor,
            Tracer,
        )
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode
    except ImportError:
        return None
    if type(tracer) is not Tracer:
        return None
    try:
        multi = tracer.span_processor
        sampler = tracer.sampler
        resource = tracer.resource
        ids = tracer.id_generator
        scope = tracer._instrumentation_scope
        info = tracer.instrumentation_info
        limits = tracer._span_limits
        is_enabled = tracer._is_enabled
        metrics = tracer._tracer_metrics
    except AttributeError:
        return None
    if type(multi) is not SynchronousMultiSpanProcessor:
        return None
    if type(metrics).__name__ != "NoOpTracerMetrics":
        return None
    max_attrs = getattr(limits, "max_span_attributes", 0)
    max_len = getattr(limits, "max_span_attribute_length", 0)
    if max_attrs is not None and max_attrs < MAX_OUR_ATTRIBUTES:
        return None
    if max_len is not None and max_len < max_value_length:
        return None
    noops = _noop_hooks()
    if not _processors_unobservable(getattr(multi, "_span_processors", None), noops):
        return None

    client = SpanKind.CLIENT
    drop = Decision.DROP
    record_and_sample = Decision.RECORD_AND_SAMPLE
    unset = Status(StatusCode.UNSET)
    error_status = Status(StatusCode.ERROR)
    sampled_flag = TraceFlags.SAMPLED
    random_flag = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
    no_links: tuple[Any, ...] = ()
    should_sample = sampler.should_sample
    trace_id_random = getattr(ids, "is_trace_id_random", lambda: False)
    new_trace_id = ids.generate_trace_id
    new_span_id = ids.generate_span_id
    on_end = multi.on_end
    checked = multi._span_processors

    def emit(name: str, attrs: Any, parent: Any, start_ns: int, end_ns: int, error: bool) -> Any:
        nonlocal checked
        processors = multi._span_processors
        if processors is not checked:
            if not _processors_unobservable(processors, noops):
                return NEEDS_SDK
            checked = processors
        if not is_enabled():
            return None
        if parent is None:
            trace_id = new_trace_id()
            random = trace_id_random()
        else:
            trace_id = parent.trace_id
            random = parent.trace_flags & random_flag
        # Context None: the sampler reads the active context, as it does for
        # start_span(context=None); it is still the statement's (same thread or task).
        result = should_sample(None, trace_id, name, client, attrs, no_links)
        decision = result.decision
        if decision is drop:
            return None
        flags = sampled_flag if decision is record_and_sample else 0
        if random:
            flags |= random_flag
        span_context = SpanContext(
            trace_id,
            new_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=result.trace_state,
        )
        on_end(
            ReadableSpan(
                name=name,
                context=span_context,
                parent=parent,
                resource=resource,
                attributes=result.attributes,
                kind=client,
                instrumentation_info=info,
                status=error_status if error else unset,
                start_time=start_ns,
                end_time=end_ns,
                instrumentation_scope=scope,
            )
        )
        return span_context

    return emit

"""N+1 detection: repeat counting per unit of work, the cause named only on a repeat.

What is counted
---------------
Within one unit of work, the same SELECT shape (fingerprint) executed again with
different values (parameters, or literals written into the text) counts once more. A
shape that loads something *per parent object* (a lazy relationship, a deferred
column, an expired object being refreshed, a dynamic or write-only collection queried
per parent) is an N+1 from the second parent on (``n_plus_one_relationship_threshold``,
default 2); any other repeated SELECT shape is one at ``n_plus_one_threshold`` (5)
repeats. Each is reported exactly once per unit of work and shape:
``sqlprobe_n_plus_one_total{engine, fingerprint, relationship}`` goes up by one and an
``n_plus_one`` warning is logged. The event is emitted when the count *reaches* the
threshold, so ``count`` is the threshold and the ``source`` line is the loop that is
doing it, while it is doing it.

A statement repeated with the same text and the same parameters as its first execution
in the unit (or with none at all, such as the same parameterless ``SELECT ... FROM
users`` five times) is a repeated query, not one query per item: it does not count.

Units of work (see ``_core._scope``)
------------------------------------
The innermost of:

* the innermost open :func:`sqlprobe.scope` (the middleware opens one per request, the
  pytest plugin one per test); its counts live in ``Scope.state`` and die with it;
* the ORM ``Session`` that runs the statement, from first use to ``close()`` (or
  ``expunge_all()``), across its commits: the ORM hook puts a weak reference to the
  Session on each connection it begins a transaction on; the counts live on the
  Session's identity map, which ``close()``/``expunge_all()`` replace, so they end
  together;
* otherwise the database transaction: the ``Transaction`` object the statement's
  ``Connection`` reports (``Connection.get_transaction()``). Its counts are kept on
  that ``Connection`` (one attribute holding the detector, a weak reference to the
  transaction and the counts), replaced when the connection's transaction changes: a
  Connection is used by one thread or task at a time, so this needs neither a lock nor
  a per-thread slot. Why not ``ConnectionEvents.begin/commit/rollback``: any
  ConnectionEvents listener moves every statement of the engine onto SQLAlchemy's
  slower dispatch path (about 2.2 µs each, see ``_hooks``).

Per unit of work at most :data:`MAX_SHAPES_PER_UNIT` shapes are counted (later new
shapes are ignored), so a long scope that runs many distinct statements stays bounded.

The statement path
------------------
The detector is the collector's unit step: for a statement that is not a SELECT it
returns after one attribute comparison; for a SELECT it finds the unit (a ContextVar
read, then a few attribute reads on the connection), does one dictionary lookup, a
comparison of the parameters and one store. Nothing is done per ORM execution besides
that: no ``do_orm_execute`` listener.

The cause, found only on a repeat
---------------------------------
When a shape first reaches the lower of the two thresholds in a unit, the detector
looks at the execution context of *that* execution, once per unit and shape
(:func:`classify`): what the ORM put there to run the statement is enough.

* ``execution_options["_sa_orm_load_options"]`` is the ORM's ``QueryContext`` load
  options: ``_lazy_loaded_from`` is the parent ``InstanceState`` of a lazy load
  (``LazyLoader._emit_lazyload``), ``_refresh_state`` the object being refreshed (a
  deferred column or an expired object, ``loading.load_scalar_attributes``);
* ``compiled.compile_state.compile_options`` holds ``_current_path`` (the loader path
  ending with the relationship: ``User -> User.orders``) and ``_only_load_props`` (the
  attributes a refresh loads). The compiled statement is the one cached for this
  statement's cache key, which includes that path, so it is the right one;
* the parent's ``load_path`` is the path it was loaded along (``User -> User.orders ->
  Order``), from which a nested load's fix is chained:
  ``selectinload(User.orders).selectinload(Order.items)``, which works on the root
  query ``select(User)`` where ``selectinload(Order.items)`` alone raises.

Then:

* a lazy load (``_lazy_loaded_from``): ``selectinload`` for a collection,
  ``joinedload`` for a many-to-one, chained along the parent's load path;
* an eager batch load (a relationship path without ``_lazy_loaded_from``:
  ``selectinload``/``subqueryload`` running their IN batches): never reported, it is
  the fix, not the problem;
* a refresh of attributes that were expired (``InstanceState.expired_attributes``,
  typically every object after ``commit()``): ``expire_on_commit=False`` or a
  re-query, since no loader option helps objects that are already loaded;
* a refresh of deferred columns: ``undefer(User.bio)`` (chained along the load path;
  ``load_only()`` with the columns needed is the other fix);
* an ORM SELECT whose WHERE clause is the parent criterion of a ``dynamic`` or
  ``write_only`` relationship (compared structurally, values aside, with the
  relationship's lazy clause): that relationship, with a one-query fix, since such
  relationships take no loader option;
* anything else (Core loops, ``session.get`` in a loop): a repeat, at
  ``n_plus_one_threshold``, with a generic suggestion.

A detection the rate limit drops costs one count and nothing more (no stack walk, no
event) unless a test capture is listening. Counting is not locked: two threads sharing
one scope may lose an increment, which can delay a detection by one statement but
never reports one twice per scope and shape (the report happens when the count
*equals* the threshold, and counts only grow).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .._core._fingerprint import Shape
from .._core._frames import SourceFinder
from .._core._ratelimit import RateLimiter
from .._core._records import AttachContext, Detection
from .._core._scope import SESSION_SLOT, current_scope_getter

__all__ = [
    "GENERIC_SUGGESTION",
    "MAX_SHAPES_PER_UNIT",
    "Cause",
    "Detector",
    "classify",
    "describe_path",
]

#: Shapes counted per unit of work (scope, Session or transaction) per engine.
MAX_SHAPES_PER_UNIT = 256
#: Characters of normalized statement text in the ``n_plus_one`` event.
STATEMENT_MAX_CHARS = 2000
#: The attribute of a ``Connection`` (transaction units) or of a Session's identity map
#: (Session units) holding the counts.
SLOT = "_sqlprobe_n_plus_one"
#: The scope names reported when no ``sqlprobe.scope`` is open.
TRANSACTION_SCOPE = "transaction"
SESSION_SCOPE = "session"
GENERIC_SUGGESTION = "load the rows in one query (an IN list or a join) instead of one per item"
#: Entries of the per-detector cache of causes of plain ORM statements (by fingerprint).
CAUSE_CACHE_MAX = 1024
#: The ORM's execution option carrying its ``QueryContext`` load options.
LOAD_OPTIONS = "_sa_orm_load_options"


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a SELECT shape repeats: what it loads per parent, if anything, and the fix.

    ``per_parent`` selects the threshold (the relationship one, or the plain one);
    ``eager`` marks an eager loader's batches, never reported.
    """

    kind: str  # "lazy", "deferred", "expired", "dynamic", "eager" or "repeat"
    relationship: str = ""
    suggestion: str = ""

    @property
    def per_parent(self) -> bool:
        return self.kind in PER_PARENT_KINDS


#: The kinds of :class:`Cause` that load something per parent object.
PER_PARENT_KINDS = frozenset({"lazy", "deferred", "expired", "dynamic"})


REPEAT = Cause("repeat")
EAGER = Cause("eager")


def _entity_name(entity: Any) -> str:
    cls = getattr(entity, "class_", None)
    return cls.__name__ if cls is not None else ""


def _chain(elements: Any) -> list[str]:
    """Loader options along a path's ``(entity, relationship)`` hops, outermost first."""
    hops = []
    items = tuple(elements)
    for i in range(0, len(items) - 1, 2):
        entity, prop = items[i], items[i + 1]
        key = getattr(prop, "key", None)
        name = _entity_name(entity)
        if not isinstance(key, str) or not name:
            return []
        loader = "selectinload" if getattr(prop, "uselist", True) else "joinedload"
        hops.append(f"{loader}({name}.{key})")
    return hops


def describe_path(path: Any) -> tuple[str, str]:
    """``("Order.items", "selectinload(User.orders).selectinload(Order.items)")``.

    ``path`` is an ORM loader path (a ``PathRegistry`` or its ``.path`` tuple) ending
    with the relationship loaded; the suggestion is chained along the whole path, so it
    applies to the query at its root.
    """
    elements = tuple(getattr(path, "path", path) or ())
    if len(elements) < 2:
        return "", ""
    hops = _chain(elements[: len(elements) - len(elements) % 2])
    if not hops:
        return "", ""
    prop, entity = elements[-1], elements[-2]
    return f"{_entity_name(entity)}.{prop.key}", ".".join(hops)


def _compile_options(context: Any) -> Any:
    compiled = getattr(context, "compiled", None)
    state = getattr(compiled, "compile_state", None)
    return getattr(state, "compile_options", None)


def _lazy(parent: Any, options: Any) -> Cause:
    current = getattr(getattr(options, "_current_path", None), "path", ())
    if not current:
        return REPEAT
    prop = current[-1]
    # The parent's own load path (how it was loaded) makes the fix apply at the root
    # query; the statement's path may start at the parent's mapper only.
    parent_path = tuple(getattr(getattr(parent, "load_path", None), "path", ()) or ())
    elements = (*parent_path, prop) if parent_path else tuple(current)
    relationship, suggestion = describe_path(elements)
    if not relationship:
        relationship, suggestion = describe_path(current)
    return Cause("lazy", relationship, suggestion) if relationship else REPEAT


def _refresh(state: Any, options: Any) -> Cause:
    mapper = getattr(state, "mapper", None)
    if mapper is None:
        return REPEAT
    cls = mapper.class_.__name__
    columns = set(mapper.column_attrs.keys())
    loading = set(getattr(options, "_only_load_props", None) or ()) & columns
    expired = loading & set(getattr(state, "expired_attributes", ()))
    if expired or getattr(state, "expired", False):
        what = f"{cls}.{next(iter(expired))}" if len(expired) == 1 and len(columns) > 1 else cls
        return Cause(
            "expired",
            f"{what} (expired)",
            f"Session(expire_on_commit=False), or re-query the {cls} rows in one "
            "SELECT after commit()",
        )
    if not loading:
        return REPEAT
    path = tuple(getattr(getattr(state, "load_path", None), "path", ()) or ())
    prefix = _chain(path[: len(path) - len(path) % 2]) if len(path) > 1 else []
    # The entity that holds the column: the last element of the path, or the mapper.
    holder = _entity_name(path[-1]) if path and len(path) % 2 == 1 else cls
    keys = sorted(loading)
    undefer = ", ".join(f"undefer({holder}.{k})" for k in keys)
    if prefix:
        undefer = ".".join([*prefix, *(f"undefer({holder}.{k})" for k in keys)])
    # A bare loader option, so that it can be applied as it is (verify-fixes);
    # load_only() is the other fix, named in the docs.
    return Cause("deferred", f"{holder}.{keys[0]}", undefer)


def _dynamic(context: Any) -> Cause:
    statement = getattr(getattr(context, "compiled", None), "statement", None)
    criteria = getattr(statement, "_where_criteria", ())
    propagate = getattr(statement, "_propagate_attrs", None) or {}
    subject = propagate.get("plugin_subject")
    target = getattr(subject, "mapper", None)
    if target is None or not criteria:
        return REPEAT
    for mapper in target.registry.mappers:
        for prop in mapper.relationships:
            if prop.lazy not in ("dynamic", "write_only") or not target.isa(prop.mapper):
                continue
            clause = getattr(getattr(prop, "_lazy_strategy", None), "_lazywhere", None)
            if clause is None:
                continue
            if any(c.compare(clause, compare_values=False) for c in criteria):
                return _dynamic_cause(prop)
    return REPEAT


def _dynamic_cause(prop: Any) -> Cause:
    parent = prop.parent.class_.__name__
    child = prop.mapper.class_.__name__
    name = f"{parent}.{prop.key}"
    where = f"select({child})"
    if prop.secondary is None and prop.local_remote_pairs:
        remote = prop.local_remote_pairs[0][1]
        try:
            key = prop.mapper.get_property_by_column(remote).key
            where = f"select({child}).where({child}.{key}.in_(parent_ids))"
        except Exception:
            pass
    return Cause(
        "dynamic",
        name,
        f"{where}: one query for all parents ({name} is {prop.lazy} and takes no loader option)",
    )


def classify(context: Any) -> Cause:
    """What the statement of ``context`` loads per parent, read from the ORM's options.

    Called once per unit of work and shape, when a repeat reaches the lower threshold;
    see the module docstring. Never raises: anything unexpected is a plain repeat.
    """
    try:
        execution_options = getattr(context, "execution_options", None) or {}
        load = execution_options.get(LOAD_OPTIONS)
        options = _compile_options(context)
        parent = getattr(load, "_lazy_loaded_from", None)
        if parent is not None:
            return _lazy(parent, options)
        refresh = getattr(load, "_refresh_state", None)
        if refresh is not None:
            return _refresh(refresh, options)
        current = getattr(getattr(options, "_current_path", None), "path", ())
        if current and getattr(current[-1], "uselist", None) is not None:
            return EAGER  # selectinload/subqueryload batches: the fix, not the problem
        return _dynamic(context)
    except Exception:
        return REPEAT


class Detector:
    """The per-engine N+1 detector; :attr:`on_statement` is the collector's unit step.

    ``count(fingerprint, relationship)`` counts every detection (the metrics sink);
    ``listeners()`` returns the functions that want every :class:`Detection` (test
    captures), each called with it.
    """

    def __init__(
        self,
        ctx: AttachContext,
        threshold: int,
        *,
        relationship_threshold: int = 2,
        count: Callable[[str, str], None],
        listeners: Callable[[], tuple[Callable[[Detection], None], ...]],
    ) -> None:
        self.engine = ctx.info.name
        self.logger = ctx.logger
        self.contain = ctx.contain
        self.threshold = threshold
        self.relationship_threshold = relationship_threshold
        self.count = count
        self.listeners = listeners
        self.finder = SourceFinder()
        # A busy endpoint with an N+1 detects it on every request: the counter counts
        # each detection, the log keeps a few per scope and shape per minute, like the
        # slow-query log, with the number left out in ``suppressed``.
        self.limiter = RateLimiter()
        #: Causes of ORM statements that load nothing per parent by themselves (the
        #: dynamic/write-only check compares clauses), by fingerprint; bounded.
        self._plain: dict[str, Cause] = {}
        self.on_statement = self._make_callback()

    def _make_callback(self) -> Callable[[Shape, str, Any, Any], None]:
        first = min(self.threshold, self.relationship_threshold)
        get_scope = current_scope_getter()
        decide = self.decide
        key = self
        ref = weakref.ref
        slot_name = SLOT
        session_slot = SESSION_SLOT

        def on_statement(shape: Shape, statement: str, context: Any, parameters: Any) -> None:
            if shape.operation != "SELECT":
                return
            unit: Any = get_scope()
            if unit is not None:
                state = unit.state
                counts = state.get(key)
                if counts is None:
                    counts = state[key] = {}
            else:
                try:
                    connection = context.root_connection
                except AttributeError:
                    return
                attrs = connection.__dict__
                # ``in`` first: a Core connection never has the Session's slot, and the
                # test costs no call.
                session = attrs[session_slot]() if session_slot in attrs else None
                if session is not None and session._transaction is not None:
                    unit = SESSION_SCOPE
                    held = session.identity_map.__dict__
                    units = held.get(slot_name)
                    if units is None:
                        units = held[slot_name] = {}
                    counts = units.get(key)
                    if counts is None:
                        counts = units[key] = {}
                else:
                    unit = TRANSACTION_SCOPE
                    # ``Connection.get_transaction()`` without its call.
                    tx = attrs.get("_transaction") or connection
                    slot = attrs.get(slot_name)
                    if slot is not None and slot[1]() is tx and slot[0] is key:
                        counts = slot[2]
                    else:
                        # A weak reference: the transaction holds the connection, so a
                        # strong one would make a reference cycle of every connection.
                        counts = {}
                        attrs[slot_name] = (key, ref(tx), counts)
            fingerprint = shape.fingerprint
            seen = counts.get(fingerprint)
            if seen is None:
                if len(counts) < MAX_SHAPES_PER_UNIT:
                    # count, first parameters, first text, next threshold, cause
                    counts[fingerprint] = [1, parameters, statement, first, None]
                return
            n = seen[0] + 1
            limit = seen[3]
            if n > limit or (parameters == seen[1] and statement == seen[2]):
                return  # reported (or eager) already, or the same values again
            seen[0] = n
            if n == limit:
                decide(shape, context, unit, seen)

        return on_statement

    def decide(self, shape: Shape, context: Any, unit: Any, seen: list[Any]) -> None:
        """A shape reached its next threshold in a unit: find the cause, maybe report."""
        cause: Cause | None = seen[4]
        if cause is None:
            cause = seen[4] = self.cause(shape, context)
        n = seen[0]
        if cause is EAGER:
            seen[3] = 0
            return
        per_parent = cause.kind in PER_PARENT_KINDS  # Cause.per_parent, without its call
        threshold = self.relationship_threshold if per_parent else self.threshold
        if n < threshold:
            seen[3] = threshold
            return
        seen[3] = 0  # once per unit and shape
        self.report(shape, cause, unit, n)

    def cause(self, shape: Shape, context: Any) -> Cause:
        """:func:`classify`, cached by fingerprint for statements that are neither a lazy
        load nor a refresh (Core, ``session.get``, hand-written ORM queries: the case
        that compares clauses with dynamic/write-only relationships)."""
        options = getattr(context, "execution_options", None) or {}
        load = options.get(LOAD_OPTIONS)
        plain = (
            getattr(load, "_lazy_loaded_from", None) is None
            and getattr(load, "_refresh_state", None) is None
        )
        if not plain:
            return classify(context)
        cached = self._plain.get(shape.fingerprint)
        if cached is None:
            cached = classify(context)
            if len(self._plain) < CAUSE_CACHE_MAX:
                self._plain[shape.fingerprint] = cached
        return cached

    def report(self, shape: Shape, cause: Cause, unit: Any, count: int) -> None:
        """Count, log and publish one detection (runs once per unit of work and shape)."""
        relationship = cause.relationship
        self.count(shape.fingerprint, relationship)
        scope_name = unit if isinstance(unit, str) else unit.name
        suppressed = self.limiter.admit(f"{scope_name}\x00{shape.fingerprint}")
        listeners = self.listeners()
        if suppressed is None and not listeners:
            return  # rate-limited and nobody listening: the count is all it costs
        detection = Detection(
            engine=self.engine,
            fingerprint=shape.fingerprint,
            statement=shape.normalized[:STATEMENT_MAX_CHARS],
            count=count,
            scope=scope_name,
            relationship=relationship,
            source=self.finder.source(sys._getframe(1)),
            suggestion=cause.suggestion or GENERIC_SUGGESTION,
        )
        if suppressed is not None:
            self.logger.warning("n_plus_one", **asdict(detection), suppressed=suppressed)
        for listener in listeners:
            try:
                listener(detection)
            except Exception:  # one broken capture must not starve the others
                self.contain("capture")

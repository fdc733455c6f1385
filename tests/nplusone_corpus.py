"""A corpus of N+1 scenarios: real ones with the expected relationship and fix, clean ones.

Each :class:`Scenario` runs an application workload against an engine that has the
corpus schema and data (:func:`prepare`); the N+1 tests attach sqlprobe and compare what
it reports with ``expected`` (``(relationship, suggestion)`` pairs; empty: must stay
clean). The workloads are plain SQLAlchemy (ORM and Core, sync and async, a WSGI
request through sqlprobe's middleware, job loops), so they can run under pytest or at
runtime alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, ForeignKey, String, Table, Text, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    Session,
    WriteOnlyMapped,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)

import sqlprobe
from sqlprobe._analysis._nplusone import GENERIC_SUGGESTION
from sqlprobe.middleware import SqlprobeWSGIMiddleware

__all__ = ["AUTHORS", "SCENARIOS", "Author", "Base", "Book", "Scenario", "prepare"]

PREFIX = "sqlprobe_n1c_"
#: Authors in the base data set; each has 2 books of 2 chapters, 2 notes and 2 tags.
AUTHORS = 6


class Base(AsyncAttrs, DeclarativeBase):
    """The corpus schema (its own metadata: tests create and drop it whole)."""


class Author(Base):
    __tablename__ = PREFIX + "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(60))
    bio: Mapped[str] = mapped_column(Text, deferred=True)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")
    notes: DynamicMapped[Note] = relationship()
    tags: WriteOnlyMapped[Tag] = relationship()


class Book(Base):
    __tablename__ = PREFIX + "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey(PREFIX + "authors.id"), index=True)
    title: Mapped[str] = mapped_column(String(60))
    author: Mapped[Author] = relationship(back_populates="books")
    chapters: Mapped[list[Chapter]] = relationship(back_populates="book", order_by="Chapter.id")
    genres: Mapped[list[Genre]] = relationship(secondary=lambda: genre_books)


genre_books = Table(
    PREFIX + "genre_books",
    Base.metadata,
    Column("genre_id", ForeignKey(PREFIX + "genres.id"), primary_key=True),
    Column("book_id", ForeignKey(PREFIX + "books.id"), primary_key=True),
)


class Genre(Base):
    __tablename__ = PREFIX + "genres"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))


class Chapter(Base):
    __tablename__ = PREFIX + "chapters"
    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int] = mapped_column(ForeignKey(PREFIX + "books.id"), index=True)
    book: Mapped[Book] = relationship(back_populates="chapters")


class Note(Base):
    __tablename__ = PREFIX + "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey(PREFIX + "authors.id"), index=True)


class Tag(Base):
    __tablename__ = PREFIX + "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey(PREFIX + "authors.id"), index=True)


class Log(Base):
    __tablename__ = PREFIX + "log"
    id: Mapped[int] = mapped_column(primary_key=True)
    line: Mapped[str] = mapped_column(String(60))


def prepare(engine: Engine) -> None:
    """Create the corpus schema (dropping any left over) and insert the base data set."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(Author),
            [{"name": f"a{a}", "bio": f"bio {a}"} for a in range(1, AUTHORS + 1)],
        )
        # Fresh tables: ids follow the insertion order (1, 2, ...) on every database.
        books = [(a, k) for a in range(1, AUTHORS + 1) for k in (1, 2)]
        conn.execute(insert(Book), [{"author_id": a, "title": f"b{a}.{k}"} for a, k in books])
        conn.execute(
            insert(Chapter),
            [{"book_id": b} for b in range(1, len(books) + 1) for _ in (1, 2)],
        )
        conn.execute(
            insert(Note), [{"author_id": a} for a in range(1, AUTHORS + 1) for _ in (1, 2)]
        )
        conn.execute(insert(Genre), [{"name": g} for g in ("essay", "novel", "poetry")])
        conn.execute(
            insert(genre_books),
            [{"genre_id": b % 3 + 1, "book_id": b} for b in range(1, len(books) + 1)],
        )
        conn.execute(insert(Tag), [{"author_id": a} for a in range(1, AUTHORS + 1) for _ in (1, 2)])


@dataclass(frozen=True)
class Scenario:
    """One workload and what N+1 detection must report for it (in any order)."""

    name: str
    run: Callable[[Engine], Any]
    expected: tuple[tuple[str, str], ...] = ()
    #: The unit of work every detection must name (``None``: not checked).
    scope: str | None = None
    #: Extra data the workload needs, inserted before sqlprobe is attached.
    setup: Callable[[Engine], None] | None = None
    #: Part of the subset also run on PostgreSQL.
    postgres: bool = False
    #: What a per-test unit (the pytest plugin's) reports instead, when it differs:
    #: the test adds up what separate Sessions or transactions count apart.
    in_test: tuple[tuple[str, str], ...] | None = None

    def expected_in_test(self) -> tuple[tuple[str, str], ...]:
        """What must be reported when the scenario runs inside a per-test unit."""
        return self.expected if self.in_test is None else self.in_test


def authors(session: Session, *options: Any, limit: int | None = None) -> list[Author]:
    query = select(Author).order_by(Author.id).options(*options)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


# -- real N+1 workloads -------------------------------------------------------------------


def lazy_one_to_many(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            assert author.books


def lazy_three_parents(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session, limit=3):
            assert author.books


def lazy_many_to_one(engine: Engine) -> None:
    with Session(engine) as session:
        for book in session.scalars(select(Book).order_by(Book.id)):
            assert book.author.name


def lazy_many_to_many(engine: Engine) -> None:
    with Session(engine) as session:
        for book in session.scalars(select(Book).order_by(Book.id)):
            assert book.genres


def nested_lazy(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            for book in author.books:
                assert book.chapters


def nested_first_hop_eager(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session, selectinload(Author.books)):
            for book in author.books:
                assert book.chapters


def nested_many_to_one(engine: Engine) -> None:
    with Session(engine) as session:
        for chapter in session.scalars(select(Chapter).order_by(Chapter.id)):
            assert chapter.book.author.name


def deferred_column(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            assert author.bio


def deferred_column_nested(engine: Engine) -> None:
    with Session(engine) as session:
        for book in session.scalars(select(Book).options(joinedload(Book.author))):
            assert book.author.bio


def expired_after_commit(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            author.name = author.name + "!"  # expired by the previous commit: reloaded
            session.commit()


def job_commits_per_item(engine: Engine) -> None:
    with Session(engine, expire_on_commit=False) as session:
        for author in authors(session):
            session.add(Log(line=f"{author.id}: {len(author.books)} books"))
            session.commit()


def dynamic_per_parent(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            assert author.notes.all()


def write_only_per_parent(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            assert session.scalars(author.tags.select()).all()


def core_loop(engine: Engine) -> None:
    books = Book.__table__
    with engine.connect() as conn:
        for a in range(1, AUTHORS + 1):
            conn.execute(select(books).where(books.c.author_id == a)).all()


def get_per_id(engine: Engine) -> None:
    with Session(engine) as session:
        for a in range(1, AUTHORS + 1):
            assert session.get(Author, a) is not None


def scoped_job_sessions(engine: Engine) -> None:
    @sqlprobe.scope("nightly")
    def job() -> None:
        for a in (1, 2, 3):  # one Session per item: the scope is the unit
            with Session(engine) as session:
                author = session.get(Author, a)
                assert author is not None and author.books

    job()


def wsgi_request(engine: Engine) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with Session(engine) as session:
            count = sum(len(author.books) for author in authors(session))
        start_response("200 OK", [])
        return [str(count).encode()]

    call_wsgi(SqlprobeWSGIMiddleware(app), "/authors")


def call_wsgi(app: Any, path: str) -> bytes:
    body = app({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None)
    try:
        return b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()


# -- clean workloads ------------------------------------------------------------------------


def many_authors(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(Author),
            [{"name": f"bulk{i}", "bio": ""} for i in range(3000)],
        )


def selectin_3000_parents(engine: Engine) -> None:
    with Session(engine) as session:
        loaded = authors(session, selectinload(Author.books).selectinload(Book.chapters))
        assert len(loaded) == AUTHORS + 3000
        assert sum(len(a.books) for a in loaded) == AUTHORS * 2


def adds_one_flush(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all([Book(author_id=1 + i % AUTHORS, title=f"n{i}") for i in range(200)])
        session.commit()


def savepoint_heavy(engine: Engine) -> None:
    with Session(engine) as session:
        author = session.get(Author, 1)
        assert author is not None
        for i in range(40):
            with session.begin_nested():
                session.add(Log(line=f"step {i}"))
        session.commit()


def six_clean_requests(engine: Engine) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        a = int(environ["PATH_INFO"].rsplit("/", 1)[1])
        with Session(engine) as session:
            author = session.get(Author, a)
            assert author is not None
            count = len(author.books)  # one lazy load per request
        start_response("200 OK", [])
        return [str(count).encode()]

    wrapped = SqlprobeWSGIMiddleware(app)
    for a in range(1, AUTHORS + 1):
        call_wsgi(wrapped, f"/authors/{a}")


def joined_many_to_one(engine: Engine) -> None:
    with Session(engine) as session:
        for book in session.scalars(select(Book).options(joinedload(Book.author))):
            assert book.author.name


def chained_eager(engine: Engine) -> None:
    with Session(engine) as session:
        options = (selectinload(Author.books).selectinload(Book.chapters),)
        for author in authors(session, *options):
            for book in author.books:
                assert book.chapters


def subquery_eager(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session, subqueryload(Author.books)):
            assert author.books


def identical_repeats(engine: Engine) -> None:
    with Session(engine) as session:
        for _ in range(10):
            session.execute(select(Author).where(Author.id == 1)).scalars().all()
            session.expunge_all()


def one_lazy_load_per_session(engine: Engine) -> None:
    for a in range(1, AUTHORS + 1):
        with Session(engine) as session:
            author = session.get(Author, a)
            assert author is not None and author.books


def single_parent(engine: Engine) -> None:
    with Session(engine) as session:
        author = authors(session, limit=1)[0]
        assert author.books and author.bio and author.notes.all()


def loaded_collection_reused(engine: Engine) -> None:
    with Session(engine) as session:
        author = authors(session, selectinload(Author.books))[0]
        for _ in range(10):
            assert author.books


def job_without_reloads(engine: Engine) -> None:
    with Session(engine, expire_on_commit=False) as session:
        for author in authors(session, selectinload(Author.books)):
            session.add(Log(line=f"{author.name}: {len(author.books)}"))
            session.commit()


def write_only_adds(engine: Engine) -> None:
    with Session(engine) as session:
        for author in authors(session):
            author.tags.add(Tag())
        session.commit()


def core_below_threshold(engine: Engine) -> None:
    books = Book.__table__
    with engine.connect() as conn:
        for a in range(1, 5):  # 4 repeats of a plain shape: under n_plus_one_threshold
            conn.execute(select(books).where(books.c.author_id == a)).all()


def distinct_shapes(engine: Engine) -> None:
    with Session(engine) as session:
        session.scalars(select(Author)).all()
        session.scalars(select(Book)).all()
        session.scalars(select(Chapter)).all()
        session.scalars(select(Note)).all()


def lazy(rel: str) -> tuple[str, str]:
    """A lazy collection loaded per parent and its fix."""
    return rel, f"selectinload({rel})"


SCENARIOS: tuple[Scenario, ...] = (
    # real N+1 cases
    Scenario(
        "lazy one-to-many", lazy_one_to_many, (lazy("Author.books"),), "session", postgres=True
    ),
    Scenario("lazy one-to-many, 3 parents", lazy_three_parents, (lazy("Author.books"),)),
    Scenario(
        "lazy many-to-one",
        lazy_many_to_one,
        (("Book.author", "joinedload(Book.author)"),),
        postgres=True,
    ),
    Scenario("lazy many-to-many", lazy_many_to_many, (lazy("Book.genres"),), postgres=True),
    Scenario(
        "nested lazy",
        nested_lazy,
        (
            lazy("Author.books"),
            ("Book.chapters", "selectinload(Author.books).selectinload(Book.chapters)"),
        ),
        postgres=True,
    ),
    Scenario(
        "nested, first hop eager",
        nested_first_hop_eager,
        (("Book.chapters", "selectinload(Author.books).selectinload(Book.chapters)"),),
    ),
    Scenario(
        "nested many-to-one",
        nested_many_to_one,
        (
            ("Chapter.book", "joinedload(Chapter.book)"),
            ("Book.author", "joinedload(Chapter.book).joinedload(Book.author)"),
        ),
    ),
    Scenario(
        "deferred column per row",
        deferred_column,
        (("Author.bio", "undefer(Author.bio)"),),
        postgres=True,
    ),
    Scenario(
        "deferred column along a path",
        deferred_column_nested,
        (("Author.bio", "joinedload(Book.author).undefer(Author.bio)"),),
    ),
    Scenario(
        "expired objects after commit",
        expired_after_commit,
        (
            (
                "Author (expired)",
                "Session(expire_on_commit=False), or re-query the Author rows in one "
                "SELECT after commit()",
            ),
        ),
        "session",
        postgres=True,
    ),
    Scenario(
        "job loop committing per item",
        job_commits_per_item,
        (lazy("Author.books"),),
        "session",
        postgres=True,
    ),
    Scenario(
        "dynamic relationship per parent",
        dynamic_per_parent,
        (
            (
                "Author.notes",
                "select(Note).where(Note.author_id.in_(parent_ids)): one query for all "
                "parents (Author.notes is dynamic and takes no loader option)",
            ),
        ),
        postgres=True,
    ),
    Scenario(
        "write-only relationship per parent",
        write_only_per_parent,
        (
            (
                "Author.tags",
                "select(Tag).where(Tag.author_id.in_(parent_ids)): one query for all "
                "parents (Author.tags is write_only and takes no loader option)",
            ),
        ),
    ),
    Scenario("Core loop", core_loop, (("", GENERIC_SUGGESTION),), "transaction", postgres=True),
    Scenario("Session.get per id", get_per_id, (("", GENERIC_SUGGESTION),), "session"),
    Scenario(
        "scoped job, a Session per item", scoped_job_sessions, (lazy("Author.books"),), "nightly"
    ),
    Scenario(
        "request through the middleware", wsgi_request, (lazy("Author.books"),), "GET /authors"
    ),
    # clean cases
    Scenario(
        "selectinload over 3,000 parents", selectin_3000_parents, setup=many_authors, postgres=True
    ),
    Scenario("200 adds, one flush", adds_one_flush, postgres=True),
    Scenario("SAVEPOINT-heavy", savepoint_heavy, postgres=True),
    Scenario("6 requests, each clean", six_clean_requests, postgres=True),
    Scenario("joinedload many-to-one", joined_many_to_one),
    Scenario("chained selectinload", chained_eager),
    Scenario("subqueryload", subquery_eager),
    Scenario("identical repeats", identical_repeats),
    Scenario(
        "one lazy load per Session",
        one_lazy_load_per_session,
        in_test=(lazy("Author.books"), ("", GENERIC_SUGGESTION)),
    ),
    Scenario("a single parent", single_parent),
    Scenario("a loaded collection reused", loaded_collection_reused),
    Scenario("job loop without reloads", job_without_reloads),
    Scenario("write-only adds", write_only_adds),
    Scenario("Core loop under the threshold", core_below_threshold),
    Scenario("distinct shapes", distinct_shapes),
)

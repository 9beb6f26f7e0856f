"""The database engine (SQLite pragmas, PostgreSQL) and its Alembic migrations."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from retrieval.errors import DatabaseUnavailableError


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def open_engine(url: str, *, migrate: bool = True) -> Engine:
    """An engine on ``url`` that answers: the SQLite file's folder created, migrations applied (or a ping).

    Raises :class:`DatabaseUnavailableError` (one line, password hidden) when the database cannot be
    reached or opened.
    """
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(url)
    try:
        if migrate:
            upgrade_database(engine)
        else:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        engine.dispose()
        raise database_unavailable(exc, url) from None
    return engine


def alembic_config(url: str) -> Config:
    """Alembic config pointing at the installed ``migrations`` package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(engine: Engine) -> None:
    """Apply every pending Alembic migration (idempotent)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def database_unavailable(exc: SQLAlchemyError, url: str) -> DatabaseUnavailableError:
    """One line for a database that cannot be opened: where (password hidden) and the driver's own reason."""
    where = make_url(url).render_as_string(hide_password=True)
    original = getattr(exc, "orig", None) or exc
    reason = " ".join(str(original).split("\n")[0].split()) or type(original).__name__
    return DatabaseUnavailableError(
        f"cannot open the database {where}: {reason} (check RETRIEVAL_DATABASE_URL and that the server is running)",
        detail={"database": where},
    )

"""Alembic environment: uses the engine handed over in ``config.attributes['engine']``."""

from alembic import context
from sqlmodel import SQLModel

from server.store import models  # noqa: F401  (registers the tables)
from server.store import fhir_models  # noqa: F401  (registers the FHIR tables)
from server.store import client_models  # noqa: F401  (registers the OAuth client tables)
from server.store import subscription_models  # noqa: F401  (registers the Subscription tables)
from server.store import gateway_models  # noqa: F401  (registers the DICOM e-mail gateway tables)

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    engine = context.config.attributes["engine"]
    with engine.begin() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=engine.dialect.name == "sqlite")
        context.run_migrations()


run_migrations_online()

"""The appliance's catalog: SQLAlchemy tables, keyword-only queries and Alembic migrations.

``open_catalog(url)`` returns a ``Catalog``; ``with catalog.begin() as session:`` is a unit of
work for the functions of ``tandem.catalog.queries`` (and ``tandem.jobs.queue``).
"""

from tandem.catalog.db import Catalog, open_catalog

__all__ = ["Catalog", "open_catalog"]

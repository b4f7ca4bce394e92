"""The compliance tests run against the same throwaway PostgreSQL as the record tests."""

from tests.records.conftest import aconn, pg_db, pg_server  # noqa: F401  (fixtures)

"""A pytest plugin for psycopg's own test suite (loaded by scripts/psycopg_suite.py): its test DSN
becomes poolbroker.postgres.conninfo() for the pool "pg" of the broker at PB_ENDPOINT, so every
connection the suite makes goes through this process's bridge. With PB_ROUTE=connect, the suite's
connection class (psycopg.Connection, which its conn_cls fixture returns) is also swapped for one
whose connect() is postgres.connect()'s: driven inline, in the caller's thread."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from poolbroker import Client, postgres
from poolbroker.postgres._bridge import bridge
from poolbroker.postgres._inline import connection_class

POOL = "pg"
_client = Client(os.environ["PB_ENDPOINT"], timeout=30)
BRIDGE_PARAMETERS = ("host", "port", "user", "dbname", "sslmode", "gssencmode")
PSYCOPG_OWN = ("autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory")
OWN = (("dbname", "database"), ("user", "user"))  # (the pool's: a connection can't ask for others)


class RoutedConnection(connection_class()):  # type: ignore[misc]
    """psycopg's Connection whose connections to the bridge are postgres.connect()'s."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        # (psycopg's own arguments as they are: conninfo_to_dict() drops a None, prepare_threshold's)
        own = {name: kwargs[name] for name in PSYCOPG_OWN if name in kwargs}
        params = conninfo_to_dict(conninfo, **{name: v for name, v in kwargs.items() if name not in own})
        here = bridge()
        if params.get("host") != here.directory:  # (somewhere else: as psycopg would)
            return super().connect(conninfo, **kwargs)
        info = here.pool_info(_client, POOL)
        if any(params.get(key, info[pool_key]) != info[pool_key] for key, pool_key in OWN):
            return super().connect(conninfo, **kwargs)  # (another database or user: the bridge refuses it)
        for name in BRIDGE_PARAMETERS:
            params.pop(name, None)
        arguments = postgres._psycopg_arguments(_client, POOL, info, None, None, {**params, **own}, True)
        conn = super().connect(**arguments)
        conn.adopt(here.take_handed(conn.info.backend_pid))
        return conn


def pytest_configure(config: pytest.Config) -> None:
    config.option.test_dsn = postgres.conninfo(_client, POOL)
    if os.environ.get("PB_ROUTE") == "connect":
        psycopg.Connection = RoutedConnection  # type: ignore[misc]

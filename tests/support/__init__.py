"""What the tests share: real processes (servers from Debian's packages, a broker, small upstreams
of our own, gunicorn), waits with deadlines, and the fixtures (tests.support.fixtures, a pytest
plugin the root conftest loads). Tests import from here: `from tests.support import Broker`."""

from tests.support.broker import Broker, broker_answers
from tests.support.processes import ROOT, free_port, run_python, short_tempdir, wait_for
from tests.support.samplers import BoundSampler, PeakSampler, upstream_connections
from tests.support.servers import (
    LOCKED_REDIS_PASSWORD,
    MemcachedServer,
    PostgresServer,
    RedisServer,
    TestCertificates,
    pg_pool,
    postgres_bin,
)
from tests.support.upstreams import HttpUpstream, TestUpstream
from tests.support.web import get, gunicorn, status

__all__ = [
    "LOCKED_REDIS_PASSWORD",
    "ROOT",
    "BoundSampler",
    "Broker",
    "HttpUpstream",
    "MemcachedServer",
    "PeakSampler",
    "PostgresServer",
    "RedisServer",
    "TestCertificates",
    "TestUpstream",
    "broker_answers",
    "free_port",
    "get",
    "gunicorn",
    "pg_pool",
    "postgres_bin",
    "run_python",
    "short_tempdir",
    "status",
    "upstream_connections",
    "wait_for",
]

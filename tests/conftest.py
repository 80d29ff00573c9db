"""The tests' fixtures come from tests.support.fixtures (a plugin: see tests/support)."""

pytest_plugins = ["tests.support.fixtures"]

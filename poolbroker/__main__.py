"""`python -m poolbroker` is the `poolbroker` command (the service)."""

from poolbroker.broker.operate.cli import main

raise SystemExit(main())

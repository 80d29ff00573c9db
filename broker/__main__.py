"""`python -m broker` is the `poolbroker` command."""

from broker.operate.cli import main

raise SystemExit(main())

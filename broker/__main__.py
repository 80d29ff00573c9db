"""`python -m broker` is the `poolbroker` command."""

from broker.cli import main

raise SystemExit(main())

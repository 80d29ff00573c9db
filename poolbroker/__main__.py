"""`python -m poolbroker` is the `poolbroker` command (the service)."""

from poolbroker.broker.operate.launch import main

raise SystemExit(main())

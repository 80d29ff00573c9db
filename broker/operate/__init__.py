"""Operations: the command line, the operator's requests (stats, leases, pause, resize, drain,
reload, shutdown), security, Prometheus metrics, logs and the live view."""

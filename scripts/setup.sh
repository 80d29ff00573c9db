# Sourced by scripts/demo and scripts/test: makes .venv with what they need, and Redis and memcached where missing.
# Idempotent and quiet once done; safe to run on a brand-new machine (root or sudo for apt-get).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

find_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        # (stderr quiet: a pyenv shim answers command -v, then says "command not found" when run)
        if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return
        fi
    done
    echo "poolbroker needs Python >= 3.11" >&2; exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_servers() {
    # Real upstreams for the tests and the demo: Debian's redis-server (built with TLS) and
    # memcached; openssl makes the test certificates; the benchmarks' load generator (wrk) and
    # peers (twemproxy, packaged as nutcracker; PgBouncer).
    local missing=()
    for tool in redis-server memcached openssl wrk nutcracker; do  # (each package has its command's name)
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    # PostgreSQL keeps its programs out of PATH (/usr/lib/postgresql/NN/bin).
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || missing+=(pgbouncer)
    [ ${#missing[@]} = 0 ] && return
    echo "setup: installing ${missing[*]} (Debian packages)" >&2
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    # The packages start system-wide instances on the default ports; ours start their own on free ports.
    as_root systemctl disable --now redis-server memcached nutcracker postgresql pgbouncer >/dev/null 2>&1 || true
}

ensure_venv() {
    local extras="$1" stamp=".venv/.installed-$1"
    if [ ! -x .venv/bin/python ]; then
        "$(find_python)" -m venv .venv
    fi
    # Reinstall when pyproject.toml changed since the last install.
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "setup: installing poolbroker[$extras] into .venv" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
        touch "$stamp"  # only reached when the install succeeded (set -e)
    fi
}

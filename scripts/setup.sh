# Sourced by scripts/demo and scripts/test: makes .venv with what they need, and Redis and memcached where missing.
# Idempotent and quiet once done; safe to run on a brand-new machine (root or sudo for apt-get).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

find_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$py"; return
        fi
    done
    echo "poolbroker needs Python >= 3.11" >&2; exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_servers() {
    # Real upstreams for the tests and the demo: Debian's redis-server (built with TLS) and
    # memcached; openssl makes the test certificates.
    command -v redis-server >/dev/null && command -v memcached >/dev/null && command -v openssl >/dev/null && return
    echo "setup: installing redis-server, memcached and openssl (Debian packages)" >&2
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server memcached openssl >/dev/null
    # The packages start system-wide instances on the default ports; ours start their own on free ports.
    as_root systemctl disable --now redis-server memcached >/dev/null 2>&1 || true
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

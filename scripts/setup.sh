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

# The Debian service each server package starts system-wide (on the default ports).
declare -A SERVICE_OF=([redis-server]=redis-server [memcached]=memcached [nutcracker]=nutcracker
                       [postgresql]=postgresql [pgbouncer]=pgbouncer [etcd-server]=etcd)

ensure_servers() {
    # Real upstreams for the tests and the demo: Debian's redis-server (built with TLS) and
    # memcached; openssl makes the test certificates; the benchmarks' load generator (wrk) and
    # peers (twemproxy, packaged as nutcracker; PgBouncer); etcd, the coordinator of brokers that
    # share one budget across hosts.
    local missing=()
    for tool in redis-server memcached openssl wrk nutcracker; do  # (each package has its command's name)
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    # PostgreSQL keeps its programs out of PATH (/usr/lib/postgresql/NN/bin).
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    [ -x /usr/sbin/pgbouncer ] || command -v pgbouncer >/dev/null || missing+=(pgbouncer)
    command -v etcd >/dev/null || missing+=(etcd-server)
    [ ${#missing[@]} = 0 ] && return
    echo "setup: installing ${missing[*]} (Debian packages)" >&2
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
    # The packages just installed start system-wide instances on the default ports; ours start
    # their own on free ports. Only those are stopped: a service the user already ran is theirs.
    local started=()
    for package in "${missing[@]}"; do
        [ -n "${SERVICE_OF[$package]:-}" ] && started+=("${SERVICE_OF[$package]}")
    done
    if [ ${#started[@]} -gt 0 ] && command -v systemctl >/dev/null; then
        as_root systemctl disable --now "${started[@]}" >/dev/null 2>&1 || true
    fi
}

# uv installs from uv.lock: the same versions on every machine, whatever was released last night.
UV_VERSION=0.13.9
UV="$ROOT/.tools/uv-$UV_VERSION/bin/uv"
export UV_PYTHON_DOWNLOADS=never  # this machine's Python (find_python's), never one fetched

ensure_uv() {
    [ -x "$UV" ] && return
    echo "setup: installing uv $UV_VERSION into .tools/" >&2
    "$(find_python)" -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$ROOT/.tools/uv-$UV_VERSION" "uv==$UV_VERSION"
}

ensure_venv() {
    # test: .venv holds exactly the lock (every extra, the test group); demo: its extra, added.
    ensure_uv
    local python; python="$(find_python)"
    case "$1" in
        test) "$UV" sync --quiet --locked --all-extras --python "$python" ;;
        demo) "$UV" sync --quiet --locked --inexact --no-default-groups --extra demo --python "$python" ;;
        *) echo "setup: unknown set $1" >&2; return 1 ;;
    esac
}

ensure_moved_venv() {
    # latest | oldest: .venv-latest or .venv-oldest, with every library we adapt or depend on at
    # its newest release, or at the floor pyproject.toml claims; the tools (pytest, ruff...) as
    # locked. Writes .venv-$1/resolved.txt, the versions it holds.
    ensure_uv
    local venv="$ROOT/.venv-$1" python; python="$(find_python)"
    [ -x "$venv/bin/python" ] || "$UV" venv --quiet --python "$python" "$venv"
    "$UV" export --quiet --locked --only-group tools --no-hashes --no-emit-project -o "$venv/tools.txt"
    "$python" scripts/library_versions.py >"$venv/libraries.txt"
    local resolution=highest; [ "$1" = oldest ] && resolution=lowest-direct  # (the libraries are direct)
    "$UV" pip compile --quiet --upgrade --resolution "$resolution" --python "$venv/bin/python" \
        "$venv/libraries.txt" "$venv/tools.txt" -o "$venv/resolved.txt"
    "$UV" pip sync --quiet --python "$venv/bin/python" "$venv/resolved.txt"
    "$UV" pip install --quiet --python "$venv/bin/python" --no-deps -e .
}

"""The set-up (scripts/setup.sh) touches only its own: it installs the server packages that are
missing and stops the system-wide services of those alone, never a service that was already there.
Run with apt-get and systemctl stood in for by recorders on PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import ROOT

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
"""
# apt-get "installs" a package by putting its command on PATH (postgresql and pgbouncer are
# looked for outside PATH: this machine has them, so they are not missing here).
APT_GET = """#!/bin/sh
echo "apt-get $*" >> "{log}"
for word in "$@"; do
    case "$word" in -*|install|update) ;; *) printf '#!/bin/sh\\n' > "{bin}/$word"; chmod +x "{bin}/$word" ;; esac
done
"""


def test_setup_stops_only_the_services_it_just_installed(tmp_path: Path) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    # Already installed (and perhaps running for the user): redis-server, openssl, wrk, nutcracker, etcd.
    for tool in ("redis-server", "openssl", "wrk", "nutcracker", "etcd"):
        (bin_dir / tool).write_text("#!/bin/sh\n")
    for recorder, text in (("systemctl", RECORDER), ("apt-get", APT_GET), ("id", "#!/bin/sh\necho 0\n")):
        (bin_dir / recorder).write_text(text.format(log=log, bin=bin_dir))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    for tool in ("dirname", "basename", "chmod"):  # (what the script and the recorders run)
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    script = f'source "{ROOT}/scripts/setup.sh"; ensure_servers'
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    result = subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert any(call.startswith("apt-get install") and call.endswith("memcached") for call in calls), calls
    [stop] = [call.split()[3:] for call in calls if call.startswith("systemctl")]
    assert "memcached" in stop and not {"redis-server", "nutcracker", "etcd"} & set(stop)  # (they were there)
    # Nothing missing: nothing installed, nothing stopped.
    log.unlink()
    result = subprocess.run(["/bin/bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not log.exists(), result.stderr
    assert os.access(bin_dir / "memcached", os.X_OK)

"""The fault soak of issue 15, bounded for CI: `bench/soak.py` run as `make soak` runs it.

Mixed traffic (streams and not, clients that hang up or time out) through the real gateway
into mock upstreams playing every fault mode; then no unhandled error in any log, nothing
in flight or leaked anywhere, the budget exact, RSS growth bounded. `RESILLM_SOAK_SECONDS`
sets the whole test's length (default 150 s, of which the last 20 start, settle and check).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
TOTAL_S = float(os.environ.get("RESILLM_SOAK_SECONDS") or 150)
SETUP_S = 20.0  # processes up, the quiet after the traffic, the checks, SIGTERM


def group_members(pgid: int) -> list[int]:
    """Live processes in this process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                    found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_fault_soak_leaks_nothing_and_bills_exactly(tmp_path: Path) -> None:
    traffic_s = max(10.0, TOTAL_S - SETUP_S)
    report = tmp_path / "soak.json"
    command = [sys.executable, str(SOAK), "--seconds", f"{traffic_s:g}", "--json", str(report)]
    command += ["--logs", str(tmp_path / "logs")]
    # Its own process group: the mocks and the gateway it starts go with it, whatever happens.
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    leftovers: list[int] = []
    try:
        output, _ = driver.communicate(timeout=traffic_s + 120)
    finally:
        if driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        else:  # the group outlives its leader only through processes left behind
            leftovers = group_members(driver.pid)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    print(output)
    assert not leftovers, f"processes left behind: {leftovers}"
    assert report.exists(), output
    checks = json.loads(report.read_text())["checks"]
    failed = [f"{c['name']}: {c['detail']}" for c in checks if not c["passed"]]
    assert not failed, "\n".join(failed) + "\n\n" + output
    assert driver.returncode == 0, output
    assert len(checks) >= 14

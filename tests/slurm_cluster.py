"""A real one-node Slurm cluster in a temporary folder, for the tests of ``submit.py`` (a pytest plugin).

``SlurmCluster.start()`` writes a ``slurm.conf`` (one node named after this machine with all its
CPUs, one partition, short timeouts, state and spool folders in the temporary folder), starts
``munged`` as the munge user with its own key, socket, PID and log files, then ``slurmctld`` and
``slurmd``, and waits until the node is idle. ``stop()`` ends exactly the daemons it started, by
the PIDs in their PID files. Clients find the cluster through ``SLURM_CONF`` (:meth:`env`).

Needs Debian's ``slurm-wlm`` and ``munge`` (``apt-get install -y slurm-wlm munge``, as root):
:func:`missing` names what is absent; the session fixture ``slurm`` then skips its tests with the
reason, which the end of the test report repeats. ``tests/conftest.py`` loads this module as a
plugin, so one cluster serves the whole session.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "srun")
PARTITION = "debug"
INSTALL = "apt-get update && apt-get install -y slurm-wlm munge"


def missing() -> Optional[str]:
    """Why no cluster can start here (a missing binary, not root, no munge user), or None."""
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"Slurm test cluster: {', '.join(absent)} not installed (as root: {INSTALL})"
    if os.geteuid() != 0:
        return "Slurm test cluster: slurmd must run as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "Slurm test cluster: no munge user (install the munge package)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One slurmctld + one slurmd (and their munged) under ``root``; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.node = socket.gethostname()
        self.cpus = os.cpu_count() or 1
        self.munge_dir = root / "munge"
        self.pid_files = {"munged": self.munge_dir / "munged.pid", "slurmctld": root / "slurmctld.pid",
                          "slurmd": root / "slurmd.pid"}

    # ------------------------------------------------------------------ set-up
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, submitit) needs to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir(exist_ok=True)
        lines = {
            "ClusterName": "gklattest", "SlurmctldHost": f"{self.node}(127.0.0.1)", "SlurmUser": "root", "SlurmdUser": "root",
            "AuthType": "auth/munge", "CredType": "cred/munge", "AuthInfo": f"socket={self.munge_dir / 'munge.socket'}",
            "SlurmctldPort": _free_port(), "SlurmdPort": _free_port(),
            "StateSaveLocation": r / "state", "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": self.pid_files["slurmctld"], "SlurmdPidFile": self.pid_files["slurmd"],
            "SlurmctldLogFile": r / "slurmctld.log", "SlurmdLogFile": r / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none", "MpiDefault": "none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/builtin", "SchedulerParameters": "sched_interval=1",
            "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
            "ReturnToService": 2, "SlurmctldTimeout": 10, "SlurmdTimeout": 10, "MessageTimeout": 10,
            "KillWait": 5, "MinJobAge": 600, "InactiveLimit": 0, "Waittime": 0, "SlurmctldParameters": "",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items() if v != "")
        text += f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN\n"
        text += f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
        self.conf.write_text(text)

    def _start_munge(self) -> None:
        user = pwd.getpwnam("munge")
        d = self.munge_dir
        d.mkdir()
        d.chmod(0o755)  # clients reach the socket inside
        os.chown(d, user.pw_uid, user.pw_gid)
        key = d / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chown(key, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o600)
        cmd = [_binary("munged"), f"--socket={d / 'munge.socket'}", f"--key-file={key}",
               f"--pid-file={self.pid_files['munged']}", f"--log-file={d / 'munged.log'}",
               f"--seed-file={d / 'munged.seed'}"]
        subprocess.run(["runuser", "-u", "munge", "--", *cmd], check=True, capture_output=True, timeout=30)

    def _run_daemon(self, name: str, *args: str) -> None:
        env = {**os.environ, **self.env()}
        subprocess.run([_binary(name), "-f", str(self.conf), *args], check=True, capture_output=True, env=env,
                       timeout=60)

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd; return once the node takes jobs."""
        self.root.chmod(0o755)  # munged (as the munge user) must reach its folder
        self._write_conf()
        self._start_munge()
        self._run_daemon("slurmctld", "-c")  # -c: no state from an earlier run
        self._run_daemon("slurmd", "-N", self.node)  # the node by name, whatever the short host name is
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm node did not come up (state {state!r}); see {self.root}/*.log")

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **self.env()},
                              check=check, timeout=60)

    # ------------------------------------------------------------------ tear-down
    def cancel_all(self, timeout: float = 60.0) -> None:
        """Cancel every job of this cluster and wait until none is left (their processes ended)."""
        self.run("scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        """End the daemons this cluster started (slurmd, slurmctld, munged), each by its PID file."""
        for name in ("slurmd", "slurmctld", "munged"):
            path = self.pid_files[name]
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def start_cluster() -> SlurmCluster:
    """A started cluster in a new temporary folder (under /tmp: the munge user must reach it)."""
    return SlurmCluster(Path(tempfile.mkdtemp(prefix="gkl-at-slurm-"))).start()


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster for the session (skips the test when Slurm is not installed)."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        try:
            cluster.cancel_all()
        finally:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say at the end of the report why the Slurm tests were skipped, if they were."""
    reason = missing()
    if reason and terminalreporter.stats.get("skipped"):
        terminalreporter.write_line(f"Slurm tests skipped: {reason}")

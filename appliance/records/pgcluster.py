"""A private PostgreSQL cluster for `voice-appliance run` and the tests (Debian ``postgresql-15``).

Production points ``records.dsn`` at the fleet's PostgreSQL (the Ansible ``postgres`` role); a single
box started with `voice-appliance run` (and every test) gets its own cluster in the state dir instead:
``initdb`` on first use (scram-sha-256, one superuser whose password is a secret file), a database for
the records created in single-user mode (no server needed yet), then ``postgres`` in the foreground on
its own loopback port with its unix socket in the cluster's run dir.

PostgreSQL refuses to run as root, so when we are root (CI, a container) the cluster belongs to the
Debian ``postgres`` system user (or ``nobody`` without it) and every server command goes through
``runuser``. The parent directories must be traversable by that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_VERSIONS = ("15", "16", "17")
DEFAULT_USER = "voice_appliance"
DEFAULT_DATABASE = "voice_appliance"


class ClusterError(RuntimeError):
    """initdb/postgres failed; the message carries the tool's output."""


def bindir() -> Path:
    """The newest installed PostgreSQL server's bin directory (Debian keeps them versioned)."""
    for v in reversed(PG_VERSIONS):
        p = Path(f"/usr/lib/postgresql/{v}/bin")
        if (p / "postgres").exists():
            return p
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise ClusterError("PostgreSQL server binaries not found (apt-get install postgresql-15)")


def os_user() -> str | None:
    """The user the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ClusterError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def as_user(argv: list[str]) -> list[str]:
    user = os_user()
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _chown(path: Path) -> None:
    user = os_user()
    if user:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass(frozen=True)
class Cluster:
    """One cluster directory: ``data/`` (PGDATA) and ``run/`` (unix socket, pid file)."""

    root: Path
    port: int
    user: str = DEFAULT_USER
    database: str = DEFAULT_DATABASE

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def dsn(self, database: str | None = None) -> str:
        """A libpq URI over loopback TCP (the password comes separately: ``records.password_file``)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self, password: str) -> bool:
        """initdb + create the records database, once. Returns True if it created the cluster."""
        if self.initialized():
            return False
        bins = bindir()
        for d in (self.root, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            _chown(d)
        if self.data_dir.exists():  # a half-made cluster from an interrupted first run
            shutil.rmtree(self.data_dir)
        user = os_user()
        if user and subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(self.root)],
                                   capture_output=True).returncode != 0:
            raise ClusterError(f"the {user!r} user cannot reach {self.root}: make its parent directories "
                               "traversable (chmod o+x) or run without the private PostgreSQL "
                               "(--no-postgres)")
        pwfile = self.root / ".initdb-pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        _chown(pwfile)
        try:
            _run(as_user([str(bins / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                          f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"]))
        finally:
            pwfile.unlink(missing_ok=True)
        if self.database != "postgres":
            # single-user mode: no server, no port, no password needed yet
            _run(as_user([str(bins / "postgres"), "--single", "-D", str(self.data_dir), "postgres"]),
                 stdin=f'CREATE DATABASE "{self.database}";\n')
        return True

    def server_command(self) -> list[str]:
        """Foreground ``postgres`` on 127.0.0.1:port, socket in ``run/``, logs to stderr."""
        return as_user([
            str(bindir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "logging_collector=off", "-c", "log_min_messages=warning",
            "-c", "max_connections=50", "-c", "shared_buffers=32MB",
        ])


def _run(argv: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, cwd="/")
    if proc.returncode != 0:
        raise ClusterError(f"{Path(argv[-1] if argv[0] != 'runuser' else argv[4]).name} failed "
                           f"({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")


class Server:
    """A running ``postgres`` (tests and benchmarks): start, wait until it accepts, stop by PID."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = cluster.root / "postgres.log"

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.cluster.server_command(), stdout=log, stderr=log, cwd="/",
                                         start_new_session=True)
        finally:
            log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        isready = str(bindir() / "pg_isready")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ClusterError(f"postgres exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            rc = subprocess.run([isready, "-q", "-h", "127.0.0.1", "-p", str(self.cluster.port)],
                                capture_output=True).returncode
            if rc == 0:
                return
            time.sleep(0.05)
        raise ClusterError("postgres did not accept connections in time")

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT to the postmaster, i.e. our child ``runuser``'s child)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        postmaster = self._postmaster_pid()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # runuser forwards nothing: signal the whole group
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # runuser may return before the postmaster has finished its shutdown checkpoint
        deadline = time.monotonic() + timeout
        while postmaster and time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):  # exited; a zombie of PID 1 here (FACTS)
                break
            time.sleep(0.05)

    def _postmaster_pid(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        return 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

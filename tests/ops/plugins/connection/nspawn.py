"""Ansible connection plugin: run tasks inside a booted systemd-nspawn container through nsenter.

Why hand-written: ansible-core ships no container connection, and ``community.general.chroot`` (with an
nsenter wrapper) lives in the ~470 MB ``ansible`` package. This is ~60 lines over ``nsenter -t PID -a``,
which enters every namespace of the container's PID 1, so modules talk to the container's real systemd.
Files move through ``cat`` on a pipe (the overlay root is not a host directory we could write to).
"""

from __future__ import annotations

import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: nspawn
short_description: Run tasks in a booted systemd-nspawn container via nsenter
description:
  - Enters all namespaces of the container's init process with nsenter and runs commands as root.
author: voice-appliance tests
options:
  leader:
    description: PID (on the controller) of the container's init process.
    type: int
    required: true
    vars:
      - name: ansible_nspawn_leader
"""


class Connection(ConnectionBase):
    """Commands via ``nsenter -t LEADER -a -- /bin/sh -c CMD``; files via ``cat``."""

    transport = "nspawn"
    has_pipelining = True
    default_user = "root"

    def _prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.get_option("leader")), "-a", "--"]

    def _connect(self) -> Connection:
        if not self._connected:
            probe = subprocess.run([*self._prefix(), "/bin/true"], capture_output=True)
            if probe.returncode != 0:
                err = probe.stderr.decode(errors="replace")
                raise AnsibleConnectionFailure(f"cannot enter container: {err}")
            self._connected = True
        return self

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = subprocess.run(
            [*self._prefix(), "/bin/sh", "-c", cmd], input=in_data, capture_output=True, check=False
        )
        return proc.returncode, proc.stdout, proc.stderr

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        with open(to_bytes(in_path), "rb") as src:
            proc = subprocess.run(
                [*self._prefix(), "/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"],
                stdin=src,
                capture_output=True,
                check=False,
            )
        if proc.returncode != 0:
            raise AnsibleError(f"put_file {out_path}: {proc.stderr.decode(errors='replace')}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        with open(to_bytes(out_path), "wb") as dst:
            proc = subprocess.run(
                [*self._prefix(), "/bin/cat", in_path], stdout=dst, stderr=subprocess.PIPE, check=False
            )
        if proc.returncode != 0:
            raise AnsibleError(f"fetch_file {in_path}: {proc.stderr.decode(errors='replace')}")

    def close(self) -> None:
        self._connected = False

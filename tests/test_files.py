"""jaxaccel.files: readers see the old file or the new one, and concurrent writers never share a
temporary file (processes on one host, or hosts on a shared file system)."""

import os
import socket
from pathlib import Path

import pytest

from jaxaccel.files import write_atomically, write_json_atomically


def test_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "eval.json"
    write_json_atomically(target, {"loss": 1.5})
    assert target.read_text().strip().startswith("{") and '"loss": 1.5' in target.read_text()

    def half_then_crash(tmp):
        Path(tmp).write_text('{"loss": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_atomically(target, half_then_crash)
    assert '"loss": 1.5' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary left behind


def test_writers_on_other_processes_or_hosts_use_other_temporary_files(tmp_path, monkeypatch):
    seen = []
    for host, pid in (("host-a", 100), ("host-a", 101), ("host-b", 100)):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        write_atomically(tmp_path / "tokens.npy", lambda tmp: (seen.append(Path(tmp).name), Path(tmp).write_text(tmp)))
    assert len(set(seen)) == 3 and all(name.startswith(".tokens.npy.") for name in seen)
    assert (tmp_path / "tokens.npy").read_text().endswith(seen[-1])  # the last rename won, whole

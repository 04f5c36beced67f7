"""Run a function in a forked child as user nobody (when the tests run as root, who reads and
writes anywhere), for the tests of what a node does where it lacks permission.

The child has the code in memory already, so it needs to read nothing but the folder it is
given: where the checkout or the interpreter lies (a 0700 folder) does not matter.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

NOBODY = 65534


def reachable_by_all(path: str) -> bool:
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in (p, *p.parents))


def temp_dir_for_nobody() -> Path:
    """A new temporary folder (mode 0755) that user nobody can reach; skips the test if
    there is none."""
    as_nobody = os.geteuid() == 0
    where = next((d for d in (tempfile.gettempdir(), "/tmp", "/var/tmp")
                  if os.path.isdir(d) and (not as_nobody or reachable_by_all(d))), None)
    if where is None:
        pytest.skip("running as root and no temp folder that user nobody can reach")
    base = Path(tempfile.mkdtemp(dir=where))
    base.chmod(0o755)
    return base


def run_as_nobody(work: Callable[[], bytes]) -> bytes:
    """work() in a forked child, as user nobody if this process is root; what it returns."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
            os.write(write_end, work())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as nobody failed"
    return b"".join(chunks)

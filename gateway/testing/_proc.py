"""Helpers for the external programs the tests drive (QEMU, testpmd): none may
outlive the test that started it, even when pytest itself is killed."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process and anything it started (it leads its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def die_with_parent() -> None:
    """In the child: get SIGKILL when the thread that started us dies (pytest killed hard)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

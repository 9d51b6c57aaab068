"""A libvirtd of the test's own, and `virsh` against it.

There is no systemd here and the host's libvirt configuration (its default NAT
network, its domains) is none of a test's business, so `Libvirtd` runs the real
daemon in a private mount namespace where /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are directories of a
temporary tree: its qemu.conf, its domains and its sockets are the test's alone,
and the namespace goes away with the daemon. virsh reaches it through
`qemu:///system?socket=...` (the socket directory is outside the bind mounts).

`close()` destroys every domain it still runs, stops the daemon (its pid, SIGTERM,
then SIGKILL) and kills any QEMU left behind (their pid files), so nothing
outlives the test.

QEMU runs as the daemon's configured user (Debian: libvirt-qemu), confined by
file permissions only (security_driver "none": no AppArmor here), without
cgroups (none delegated to us) and writing its log to a file (no virtlogd).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.testing._proc import die_with_parent, signal_group
from gateway.testing.lifecycle import Started

LIBVIRTD = "libvirtd"
VIRSH = "virsh"
TIMEOUT = 60

# (our subdirectory, where libvirtd looks)
MOUNTS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
          ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"))

_START = """set -e
while [ $# -gt 1 ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done
exec libvirtd --config "$1" --pid-file "$1.pid"
"""


class LibvirtError(RuntimeError):
    pass


def available() -> bool:
    return all(shutil.which(b) for b in (LIBVIRTD, VIRSH, "unshare"))


class Libvirtd(Started):
    def __init__(self, qemu_conf: str = "", *, keep_logs: Path | None = None) -> None:
        """`keep_logs`: a directory the daemon's and QEMU's logs are copied to on close."""
        self.keep_logs = keep_logs
        # world-searchable: QEMU runs as libvirt's user and opens files under it
        self.root = Path(tempfile.mkdtemp(prefix="gwt-libvirt-"))
        self.root.chmod(0o755)
        for sub, _ in MOUNTS:
            (self.root / sub).mkdir(mode=0o755)
        self.sock_dir = self.root / "sock"
        self.sock_dir.mkdir(mode=0o700)
        self.log = self.root / "libvirtd.log"
        self.conf = self.root / "libvirtd.conf"
        self.conf.write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.log}"\n')
        (self.root / "etc" / "qemu.conf").write_text(
            'security_driver = "none"\ncgroup_controllers = [ ]\nstdio_handler = "file"\n'
            + qemu_conf)
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Libvirtd:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _START, "sh"]
        for sub, where in MOUNTS:
            argv += [str(self.root / sub), where]
        argv.append(str(self.conf))  # libvirtd's own pid file is /run/libvirtd.pid: not ours
        with open(self.root / "stderr", "w") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + TIMEOUT
        while True:  # ready when virsh gets an answer
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited ({self.proc.returncode}): "
                                   f"{(self.root / 'stderr').read_text()[-2000:]}")
            r = self.virsh("version", check=False)
            if r.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd not answering: {r.stderr}")
            time.sleep(0.2)

    def virsh(self, *args: str, check: bool = True, timeout: float = TIMEOUT
              ) -> subprocess.CompletedProcess:
        r = subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode:
            raise LibvirtError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r

    def define_and_start(self, xml: str) -> str:
        path = self.root / f"domain-{time.monotonic_ns()}.xml"
        path.write_text(xml)
        name = re.search(r"<name>([^<]+)</name>", xml).group(1)
        self.virsh("define", str(path))
        self.virsh("start", name, timeout=120)
        return name

    def qemu_log(self, domain: str) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "log" / "qemu" / f"{domain}.log").read_text()
        return ""

    def qemu_pids(self) -> list[int]:
        pids = []
        for f in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(f.read_text().strip()))
        return pids

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            r = self.virsh("list", "--name", check=False, timeout=30)
            for name in r.stdout.split():
                self.virsh("destroy", name, check=False, timeout=30)
        leftover = self.qemu_pids()
        if self.proc is not None:
            if self.proc.poll() is None:
                signal_group(self.proc, signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    signal_group(self.proc, signal.SIGKILL)
                    self.proc.wait()
            self.proc = None
        for pid in leftover:  # a domain libvirt could not destroy must not outlive us
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.keep_logs is not None:
            for f in [self.log, *(self.root / "log" / "qemu").glob("*.log")]:
                with contextlib.suppress(OSError):
                    shutil.copy(f, self.keep_logs / f.name)
        shutil.rmtree(self.root, ignore_errors=True)


class Console:
    """A domain's serial console written to a file: wait for lines as QemuGuest does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cursor = 0

    def lines(self) -> list[str]:
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return []
        return [ln.replace("\r", "") for ln in text.split("\n")[:-1]]  # whole lines only

    def skip(self) -> None:
        """Later waits see only lines written from now on."""
        self._cursor = len(self.lines())

    def wait_for(self, pattern: str, timeout: float = 60, *, check=None) -> re.Match:
        """The next line after the previous match that matches; `check()` is called
        while waiting (e.g. to fail early when the domain stopped)."""
        pat = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while True:
            lines = self.lines()
            while self._cursor < len(lines):
                line = lines[self._cursor]
                self._cursor += 1
                if "Kernel panic" in line:
                    raise LibvirtError(f"guest panicked:\n{self.tail()}")
                m = pat.search(line)
                if m:
                    return m
            if check is not None and time.monotonic() - checked > 2:  # a virsh call each
                check()
                checked = time.monotonic()
            if time.monotonic() > deadline:
                if check is not None:
                    check()  # a stopped domain is the better explanation
                raise LibvirtError(f"timeout ({timeout:.0f}s) waiting for {pattern!r}\n"
                                   f"--- console ---\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines()[-n:])


def domain_xml(name: str, *, kernel: Path, initrd: Path, cmdline: str, console: Path,
               devices: str = "", memory_backing: str = "", memory_mb: int = 256) -> str:
    """A TCG domain booting `kernel`; `devices` and `memory_backing` are pasted in
    as given (the gateway's printed elements)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  {memory_backing}
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <console type='file'><source path='{console}'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
    {devices}
  </devices>
</domain>
"""

"""A tiny Linux guest for QEMU under TCG, built from Debian packages and cached.

The guest is the Debian bookworm kernel (the ``linux-image-6.1.0-*-amd64``
package that ``linux-image-amd64`` depends on) plus an initramfs holding
busybox-static and the eight virtio-net modules. Nothing else: it boots in a
few seconds under TCG and runs one shell script.

API:

``ensure_guest(cache_dir=None) -> GuestImage``
    Download + extract + pack once, then reuse. The cache lives in
    ``cache_dir`` or ``$GATEWAY_CACHE`` or ``/var/cache/gateway``, one
    directory per kernel version (``guest-<kver>-v<FORMAT>``), created
    atomically (built in a temp dir, then renamed).

``make_initrd(image, script, dest) -> Path``
    Writes ``dest`` = base initramfs + a second newc archive holding
    ``/scenario.sh`` (the kernel unpacks concatenated archives in order).

``GuestImage.kernel / .initrd / .version / .cmdline``
    ``cmdline`` is a kernel command line for a serial console on ttyS0.

The base ``/init`` mounts proc/sys/devtmpfs, insmods the modules in order,
prints ``GW-GUEST: modules loaded``, runs ``sh /scenario.sh`` if present,
prints ``GW-GUEST: scenario exit <rc>`` and powers off (``poweroff -f``), so
QEMU started with ``-no-reboot`` exits by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Bump when the layout or /init of the base image changes: old caches are
# then ignored (and rebuilt under a new name).
FORMAT = 2

MODULES = (
    "failover",
    "net_failover",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_net",
)

META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")

MARK_MODULES = "GW-GUEST: modules loaded"
MARK_EXIT_RE = r"GW-GUEST: scenario exit (\S+)"

KERNEL_CMDLINE = (
    "console=ttyS0,115200 quiet loglevel=3 panic=-1 oops=panic "
    "mitigations=off nokaslr tsc=unstable no_timer_check "
    "rdinit=/init"
)

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
if ! mount -t devtmpfs devtmpfs /dev 2>/dev/null; then
    mount -t tmpfs -o mode=0755 dev /dev
    mdev -s
fi
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in {" ".join(MODULES)}; do
    insmod /lib/modules/$m.ko || echo "GW-GUEST: insmod $m failed"
done
ip link set lo up 2>/dev/null
# the firmware leaves its last line unterminated: start a fresh line
echo
echo "{MARK_MODULES}"
if [ -f /scenario.sh ]; then
    sh /scenario.sh
    rc=$?
else
    rc=none
fi
echo "GW-GUEST: scenario exit $rc"
sync
poweroff -f
"""


class GuestBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    version: str
    cmdline: str = KERNEL_CMDLINE


# --------------------------------------------------------------------- cpio


class CpioWriter:
    """Minimal writer for the "newc" (SVR4, no CRC) cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1
        self._size = 0

    def _put(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)

    def _pad(self) -> None:
        if self._size % 4:
            self._put(b"\0" * (4 - self._size % 4))

    def add(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        rdev: tuple[int, int] = (0, 0),
        nlink: int = 1,
    ) -> None:
        name_b = name.lstrip("/").encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: fixed, so the output is reproducible
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(name_b),
            0,  # check
        )
        self._ino += 1
        self._put(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._put(name_b)
        self._pad()
        if data:
            self._put(data)
            self._pad()

    def dir(self, name: str, perm: int = 0o755) -> None:
        self.add(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        # The kernel reads archives in 512-byte blocks less strictly than cpio(1),
        # but pad anyway so concatenation never splits a header.
        if self._size % 512:
            self._put(b"\0" * (512 - self._size % 512))
        return b"".join(self._chunks)


def _cpio_dirs(w: CpioWriter, paths: Iterable[str]) -> None:
    done: set[str] = set()
    for p in paths:
        parts = p.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in done:
                done.add(d)
                w.dir(d)


# ------------------------------------------------------------------- build


def default_cache_dir() -> Path:
    env = os.environ.get("GATEWAY_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/gateway")
    if os.geteuid() == 0 or os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path.home() / ".cache" / "gateway"


@functools.lru_cache(maxsize=1)
def kernel_package() -> str:
    """Name of the versioned kernel package the linux-image-amd64 meta-package pulls in."""
    try:
        out = subprocess.run(
            ["apt-cache", "depends", META_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestBuildError(f"apt-cache depends {META_PACKAGE} failed: {e}") from e
    m = re.search(r"Depends:\s*(linux-image-[0-9][\w.+-]*-amd64)\b", out)
    if not m:
        raise GuestBuildError(f"no linux-image-*-amd64 dependency in:\n{out}")
    return m.group(1)


def _image_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"guest-{version}-v{FORMAT}"


def _image_from_dir(d: Path, version: str) -> GuestImage | None:
    kernel, initrd = d / "vmlinuz", d / "base.cpio"
    if kernel.is_file() and initrd.is_file():
        return GuestImage(kernel=kernel, initrd=initrd, version=version)
    return None


def _cached_any(cache_dir: Path) -> GuestImage | None:
    """Newest complete cached image, whatever its kernel version."""
    pat = re.compile(rf"guest-(.+)-v{FORMAT}")
    found = []
    if cache_dir.is_dir():
        for d in cache_dir.iterdir():
            m = pat.fullmatch(d.name)
            if m and (img := _image_from_dir(d, m.group(1))):
                found.append((d.stat().st_mtime, img))
    return max(found, key=lambda t: t[0])[1] if found else None


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def _download(package: str, dest: Path) -> Path:
    cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root", package]
    try:
        _run(cmd, dest)
    except GuestBuildError:
        if os.geteuid() != 0:
            raise
        # Stale package lists (the mirror moved on): refresh once and retry.
        _run(["apt-get", "update", "-qq"], dest)
        _run(cmd, dest)
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {package} produced no .deb")
    return debs[0]


def _extract(deb: Path, version: str) -> tuple[bytes, dict[str, bytes]]:
    """(vmlinuz bytes, {module name: uncompressed .ko bytes}) from the kernel .deb."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    kernel = None
    modules: dict[str, bytes] = {}
    wanted = set(MODULES)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.lstrip("./")
                base = name.rsplit("/", 1)[-1]
                if name == f"boot/vmlinuz-{version}":
                    kernel = tar.extractfile(member).read()
                    continue
                if not name.startswith(f"lib/modules/{version}/"):
                    continue
                m = re.fullmatch(r"(.+)\.ko(\.xz)?", base)
                if not m or m.group(1) not in wanted:
                    continue
                data = tar.extractfile(member).read()
                if m.group(2):
                    # busybox insmod cannot load compressed modules: unpack now
                    data = lzma.decompress(data)
                modules[m.group(1)] = data
    finally:
        if proc.stdout:
            proc.stdout.close()
        rc = proc.wait()
    if rc:
        raise GuestBuildError(f"dpkg-deb --fsys-tarfile {deb} failed ({rc})")
    if kernel is None:
        raise GuestBuildError(f"boot/vmlinuz-{version} not in {deb.name}")
    missing = wanted - modules.keys()
    if missing:
        raise GuestBuildError(f"modules not found in {deb.name}: {sorted(missing)}")
    return kernel, modules


def build_base_cpio(modules: dict[str, bytes], busybox: Path = BUSYBOX) -> bytes:
    if not busybox.is_file():
        raise GuestBuildError(f"{busybox} missing: apt-get install busybox-static")
    w = CpioWriter()
    _cpio_dirs(
        w,
        [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "etc",
            "root",
            "lib/modules",
        ],
    )
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.chardev("dev/ttyS0", 4, 64)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", INIT_SCRIPT.encode(), 0o755)
    w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.file("etc/group", b"root:x:0:\n")
    for name in MODULES:
        w.file(f"lib/modules/{name}.ko", modules[name])
    return w.finish()


@contextlib.contextmanager
def _locked(cache_dir: Path):
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_guest(cache_dir: Path | str | None = None) -> GuestImage:
    """Return the cached guest image, building it first if needed."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        package = kernel_package()
    except GuestBuildError:
        # No apt here (or no lists): any cached image will do.
        img = _cached_any(cache_dir)
        if img:
            return img
        raise
    version = package.removeprefix("linux-image-")
    final = _image_dir(cache_dir, version)
    img = _image_from_dir(final, version)
    if img:
        return img
    with _locked(cache_dir):
        img = _image_from_dir(final, version)  # built by someone else meanwhile
        if img:
            return img
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            dl = tmp / "dl"
            dl.mkdir()
            try:
                deb = _download(package, dl)
            except GuestBuildError:
                img = _cached_any(cache_dir)  # offline: fall back to an older kernel
                if img:
                    return img
                raise
            kernel, modules = _extract(deb, version)
            shutil.rmtree(dl)
            out = tmp / "image"
            out.mkdir()
            (out / "vmlinuz").write_bytes(kernel)
            (out / "base.cpio").write_bytes(build_base_cpio(modules))
            (out / "VERSION").write_text(f"{package}\nformat {FORMAT}\n")
            out.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    img = _image_from_dir(final, version)
    assert img is not None
    return img


def net_up(ip: str) -> str:
    """Guest shell lines: eth0 up with `ip`/24, then wait (up to 10 s) for carrier,
    which comes when the vhost-user back-end has the device running."""
    return (f"ip link set eth0 up\nip addr add {ip}/24 dev eth0\ni=0\n"
            'while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 100 ]; do\n'
            "    sleep 0.1; i=$((i+1))\ndone\n")


def scenario_cpio(script: str, files: dict[str, bytes] | None = None) -> bytes:
    """A newc archive holding /scenario.sh (and optional extra files)."""
    w = CpioWriter()
    w.file("scenario.sh", script.encode(), 0o755)
    for name, data in sorted((files or {}).items()):
        parent = name.strip("/").rsplit("/", 1)
        if len(parent) == 2:
            _cpio_dirs(w, [parent[0]])
        w.file(name, data, 0o755)
    return w.finish()


def make_initrd(
    image: GuestImage,
    script: str,
    dest: Path | str,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write base initramfs + /scenario.sh (+ ``files``: path -> bytes) to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as out, open(image.initrd, "rb") as base:
        shutil.copyfileobj(base, out)
        out.write(scenario_cpio(script, files))
    tmp.replace(dest)
    return dest

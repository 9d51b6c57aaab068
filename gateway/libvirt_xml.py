"""What libvirt needs for a device: the `<interface>` and `<memoryBacking>` elements,
and a note when libvirt's QEMU user could not reach a device socket.

Each element stands alone: `<memoryBacking>` goes in the domain once (vhost-user
needs the guest's RAM in shared memory the gateway can map), `<interface>` once
per device, and `virsh attach-device` takes the interface by itself. Pure text
from the device's fields, so the CLI renders it too (with the queue sizes the
operator asks for). Tested against a real libvirtd in tests/test_libvirt.py.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
from xml.sax.saxutils import escape

# virtio-net in QEMU: rx_queue_size and tx_queue_size are powers of two from 256
# (the default) to 1024 (VIRTQUEUE_MAX_SIZE); tx_queue_size > 256 only for vhost-user.
QUEUE_SIZES = (256, 512, 1024)

MEMORY_BACKING = ("<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n"
                  "</memoryBacking>")

QEMU_CONF = "/etc/libvirt/qemu.conf"
DEFAULT_QEMU_USER = "libvirt-qemu"  # Debian's build default (qemu.conf's "#user = ...")


def check_queue_size(option: str, size: int) -> None:
    if size not in QUEUE_SIZES:
        raise ValueError(f"{option} {size}: use {', '.join(map(str, QUEUE_SIZES))} "
                         "(a power of two from 256 to 1024)")


def interface(*, mac: str, socket: str, mode: str, queues: int = 1,
              rx_queue_size: int | None = None, tx_queue_size: int | None = None) -> str:
    """The `<interface type='vhostuser'>` element for a device.

    `mode` is the gateway's ("server": it listens, QEMU connects; "client": QEMU
    listens): libvirt's `mode` names QEMU's side, so it is the other one. When
    QEMU connects, `<reconnect>` makes it dial again after the daemon restarts;
    without it the guest keeps a dead link until the domain is restarted."""
    for opt, size in (("rx_queue_size", rx_queue_size), ("tx_queue_size", tx_queue_size)):
        if size is not None:
            check_queue_size(opt, size)
    qemu_mode = "server" if mode == "client" else "client"
    path = escape(socket, {"'": "&apos;"})
    src = f"  <source type='unix' path='{path}' mode='{qemu_mode}'"
    src += ("/>" if qemu_mode == "server"
            else ">\n    <reconnect enabled='yes' timeout='1'/>\n  </source>")
    driver = {"queues": queues if queues > 1 else None, "rx_queue_size": rx_queue_size,
              "tx_queue_size": tx_queue_size}
    attrs = " ".join(f"{k}='{v}'" for k, v in driver.items() if v is not None)
    return ("<interface type='vhostuser'>\n"
            f"  <mac address='{mac}'/>\n{src}\n  <model type='virtio'/>\n"
            + (f"  <driver {attrs}/>\n" if attrs else "") + "</interface>")


def domain_parts(a) -> str:
    """Both elements, as `gateway attach` prints them (`a`: an Attachment)."""
    return MEMORY_BACKING + "\n" + interface(mac=a.mac, socket=a.socket, mode=a.mode,
                                             queues=a.queues)


# -- can libvirt's QEMU reach the socket? ------------------------------------------

def qemu_user(conf: str = QEMU_CONF) -> str | None:
    """The user libvirt runs QEMU as: qemu.conf's `user`, else Debian's default if
    that user exists; None when libvirt is not installed."""
    try:
        with open(conf, encoding="utf-8") as f:
            for line in f:
                m = re.match(r'\s*user\s*=\s*"([^"]+)"', line)
                if m:
                    return m.group(1).lstrip("+")  # "+64055": a uid, not a name
    except OSError:
        pass
    try:
        pwd.getpwnam(DEFAULT_QEMU_USER)
    except KeyError:
        return None
    return DEFAULT_QEMU_USER


def _can(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in gids:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def access_note(socket: str, user: str | None, mode: str = "server") -> str | None:
    """One line naming the fix when `user` (libvirt's QEMU) could not connect to the
    socket the gateway listens on (mode "server"), or could not create the one it
    is to listen on itself (mode "client"); None when it can, or there is no such user."""
    if not user:
        return None
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        return None
    if pw.pw_uid == 0:
        return None
    gids = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    who = f"libvirt runs QEMU as {pw.pw_name}, who"
    parent = os.path.dirname(socket)
    ancestors = [parent]
    while ancestors[-1] != "/":
        ancestors.append(os.path.dirname(ancestors[-1]))
    for path in reversed(ancestors):  # each directory on the way needs search (x) permission
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not _can(st, pw.pw_uid, gids, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return f"{who} cannot enter {path}: 'chmod o+x {path}', or put the socket elsewhere"
    if mode == "client":
        if os.path.exists(socket) or _can(os.stat(parent), pw.pw_uid, gids,
                                          (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)):
            return None
        return (f"{who} cannot create {socket} in {parent}: keep QEMU's sockets in a "
                f"directory it owns ('install -d -o {pw.pw_name} DIR'), or attach without "
                "--client")
    try:
        st = os.stat(socket)
    except OSError:
        return None
    if _can(st, pw.pw_uid, gids, (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)):
        return None
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    if group != "gateway":  # the socket was made before the group existed
        return (f"{who} cannot connect to {socket} (group {group}): 'groupadd --system "
                f"gateway', restart the gateway daemon, then 'usermod -aG gateway "
                f"{pw.pw_name}'; or attach with --client")
    return (f"{who} is not in group gateway and cannot connect to {socket}: "
            f"'usermod -aG gateway {pw.pw_name}' (domains started after that can); "
            "or attach with --client")

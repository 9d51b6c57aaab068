"""The XDP program's compiler process: bcc builds and loads it here, never in the daemon.

    python -m gateway.xdp._compile SOCK_FD MAX_DEVICES MAX_QUEUES

bcc compiles with LLVM/clang, which maps ~100 MiB of libraries and keeps ~30 MiB
of heap after one compile; a long-lived daemon would carry both for good. So
`XdpProgram` (program.py) starts this module as a short-lived child process: it
imports bcc, compiles bpf/gateway_xdp.c, lets bcc create the maps and load the
program (BPF_PROG_LOAD), then sends the program's fd and the maps' fds to the
daemon over the unix socket SOCK_FD (SCM_RIGHTS, one SEQPACKET message: JSON
`{"maps": [names in fd order]}` or `{"error": "..."}`) and exits. The kernel
objects live on through the daemon's copies of the fds; the daemon attaches the
program and drives the maps with libbpf (program.py, maps.py). bcc stays the
loader: this is the only place that imports it.

This module also holds what finding bcc, the kernel headers and the C source
takes (program.py re-exports it), and imports nothing heavy at module level,
so that the child starts fast and the daemon stays small.
"""

from __future__ import annotations

import array
import glob
import importlib.util
import json
import os
import platform
import shlex
import socket
import sys
from pathlib import Path

PROG_NAME = "gateway_xdp"
# The maps the daemon gets, in this order after the program's fd.
MAPS = ("mac2slot", "devices", "xsks", "counters", "gcounters", "held")
MAX_MESSAGE = 65536  # the one message's JSON, error text included
MAX_ERROR = 16384  # characters of an error's text that travel

ENV_SOURCE = "BCC_KERNEL_SOURCE"
ENV_CFLAGS = "GATEWAY_BPF_CFLAGS"
ENV_BPF_SOURCE = "GATEWAY_BPF_SOURCE"

DEBIAN_BCC = "/usr/lib/python3/dist-packages/bcc"


class XdpError(Exception):
    """The XDP program cannot be built, attached or driven."""


# ------------------------------------------------------------------ environment


def bcc_available() -> None:
    """Raise import_bcc()'s XdpError when bcc cannot be found, without importing it:
    importing bcc maps libbcc and LLVM into the process (~60 MiB resident), which the
    daemon must never carry."""
    try:
        if importlib.util.find_spec("bcc") is not None:
            return
    except (ImportError, ValueError):
        pass
    if os.path.isfile(os.path.join(DEBIAN_BCC, "__init__.py")):
        return
    raise XdpError("cannot import bcc (No module named 'bcc'): apt-get install python3-bpfcc "
                   "(bcc is not on PyPI)")


def import_bcc():
    """The `bcc` module, or an XdpError that says how to get it.

    bcc is not on PyPI (that name is another project), so a venv usually lacks
    it: then Debian's pure-Python package is loaded from its own directory,
    without putting all of dist-packages (Debian's cffi, ...) on sys.path."""
    try:
        import bcc
        return bcc
    except ImportError as e:
        first = e
    init = os.path.join(DEBIAN_BCC, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(
            "bcc", init, submodule_search_locations=[DEBIAN_BCC])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
            return module
        except Exception as e:
            del sys.modules["bcc"]
            first = e
    raise XdpError(f"cannot import bcc ({first}): apt-get install python3-bpfcc "
                   "(bcc is not on PyPI)")


def find_kernel_headers() -> tuple[str, list[str]]:
    """(BCC_KERNEL_SOURCE directory, extra clang flags) for compiling the program.

    Debian's linux-headers-amd64 splits the headers in two: /usr/src/linux-headers-V-common
    (kconfig.h, what bcc wants as its kernel source) and /usr/src/linux-headers-V-amd64
    (generated headers, passed with -I). $BCC_KERNEL_SOURCE and $GATEWAY_BPF_CFLAGS win when
    set. XDP needs only UAPI headers, so headers older than the running kernel do.
    """
    env_src, env_cflags = os.environ.get(ENV_SOURCE), os.environ.get(ENV_CFLAGS)
    if env_src and env_cflags is not None:
        return env_src, shlex.split(env_cflags)
    arch_dir = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
    kernel_arch = {"amd64": "x86", "arm64": "arm64"}[arch_dir]
    found = None
    for common in sorted(glob.glob("/usr/src/linux-headers-*-common"), key=_version_key):
        arch = common[: -len("-common")] + f"-{arch_dir}"
        if os.path.isdir(arch) and os.path.exists(os.path.join(common, "include/linux/kconfig.h")):
            found = common, arch
    if found is None:
        if env_src:
            return env_src, []
        raise XdpError("kernel headers for bcc not found: "
                       f"apt-get install linux-headers-{arch_dir}")
    common, arch = found
    cflags = [f"-I{arch}/{d}" for d in (f"arch/{kernel_arch}/include/generated", "include",
                                        f"arch/{kernel_arch}/include/generated/uapi",
                                        "include/generated/uapi")]
    if env_cflags is not None:
        cflags = shlex.split(env_cflags)
    return env_src or common, cflags


def _version_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in
            path.replace("-", ".").split(".")]


def bpf_source() -> Path:
    """Path of gateway_xdp.c (see program.py's docstring for the search order)."""
    env = os.environ.get(ENV_BPF_SOURCE)
    if env:
        p = Path(env)
        if not p.is_file():
            raise XdpError(f"${ENV_BPF_SOURCE}={env} is not a file")
        return p
    here = Path(__file__).resolve().parent
    for p in (here / "gateway_xdp.c", here.parent.parent / "bpf" / "gateway_xdp.c"):
        if p.is_file():
            return p
    raise XdpError(f"bpf/gateway_xdp.c not found next to the gateway package ({here}): "
                   f"set ${ENV_BPF_SOURCE} to its path")


# ------------------------------------------------------------------ the child


def compile_and_load(max_devices: int, max_queues: int):
    """(bcc.BPF, program fd): the program compiled, its maps created, the program loaded."""
    bcc = import_bcc()
    src_dir, cflags = find_kernel_headers()
    os.environ[ENV_SOURCE] = src_dir  # bcc reads it at compile time
    cflags = [*cflags, f"-DMAX_DEVICES={max_devices}", f"-DMAX_QUEUES={max_queues}"]
    path = bpf_source()
    try:
        bpf = bcc.BPF(src_file=str(path).encode(), cflags=cflags)
        fn = bpf.load_func(PROG_NAME.encode(), bcc.BPF.XDP)
    except Exception as e:
        raise XdpError(f"compiling/loading {path} failed: {e} (kernel source {src_dir}, "
                       f"cflags {' '.join(cflags)})") from e
    return bpf, fn.fd


def main(argv: list[str]) -> int:
    try:
        fd, max_devices, max_queues = (int(a) for a in argv)
    except ValueError:
        print(f"usage: python -m {__spec__.name} SOCK_FD MAX_DEVICES MAX_QUEUES",
              file=sys.stderr)
        return 2
    sock = socket.socket(fileno=fd)
    try:
        bpf, prog_fd = compile_and_load(max_devices, max_queues)
        fds = [prog_fd, *(bpf[name.encode()].map_fd for name in MAPS)]
        msg = {"maps": list(MAPS)}
    except XdpError as e:
        fds, msg = [], {"error": str(e)[:MAX_ERROR]}
    except Exception as e:  # bcc raises plain Exception; the daemon must hear of it
        fds, msg = [], {"error": f"XDP compiler process: {type(e).__name__}: {e}"[:MAX_ERROR]}
    data = json.dumps(msg).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)
    sock.close()
    return 0 if fds else 1  # exiting closes our fds: the daemon's copies keep the objects


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

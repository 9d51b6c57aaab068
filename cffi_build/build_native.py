"""Builds gateway._native: the C burst loops and the libxdp (AF_XDP) bindings.

Everything per-packet lives in this one extension so that cffi can drop the
GIL for a whole burst and one worker thread per queue runs in parallel.
"""

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

# gw_xsk.h: libxdp's declarations for cdef, then (after the marker) gw_xsk.c's
# prototypes, which the C side needs too; C gets libxdp's from <xdp/xsk.h>.
XSK_H = (HERE / "gw_xsk.h").read_text()
XSK_C_PART = XSK_H[XSK_H.index("/* GW_XSK_C_PART"):]

ffibuilder = FFI()
ffibuilder.cdef((HERE / "gw_ring.h").read_text())
ffibuilder.cdef(XSK_H)
ffibuilder.cdef((HERE / "gw_capture.h").read_text())
ffibuilder.cdef((HERE / "gw_xskq.h").read_text())
ffibuilder.cdef((HERE / "gw_offload.h").read_text())
ffibuilder.set_source(
    "gateway._native",
    '#include <stdint.h>\n#include "gw_ring.h"\n'
    "#include <linux/bpf.h>\n#include <linux/if_xdp.h>\n#include <xdp/xsk.h>\n" + XSK_C_PART
    + '\n#include "gw_capture.h"\n#include "gw_xskq.h"\n#include "gw_offload.h"\n',
    sources=[str((HERE / n).relative_to(HERE.parent))
             for n in ("gw_ring.c", "gw_xsk.c", "gw_xskq.c", "gw_offload.c", "gw_capture.c")],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    libraries=["xdp", "bpf"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

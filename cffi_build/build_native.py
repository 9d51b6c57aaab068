"""Builds gateway._native: the C burst loops and, later, the libxdp bindings.

Everything per-packet lives in this one extension so that cffi can drop the
GIL for a whole burst and one worker thread per queue runs in parallel.
"""

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "gw_ring.h").read_text())
ffibuilder.set_source(
    "gateway._native",
    '#include <stdint.h>\n#include "gw_ring.h"',
    sources=[str((HERE / "gw_ring.c").relative_to(HERE.parent))],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

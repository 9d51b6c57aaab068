"""setuptools needs this file for two build steps pyproject.toml cannot say:
the cffi extension (gateway._native) and shipping bpf/gateway_xdp.c inside the
package (gateway/xdp/), where an installed gateway finds its XDP program."""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


class BuildPyWithBpf(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads bpf/ in the checkout
            dest = pathlib.Path(self.build_lib) / "gateway" / "xdp"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / "bpf" / "gateway_xdp.c", dest / "gateway_xdp.c")


setup(
    cffi_modules=["cffi_build/build_native.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithBpf},
)

"""`pip install .` into a fresh venv gives a working `gateway`, with no .pth or env vars."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pip_install_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("BCC_KERNEL_SOURCE", "GATEWAY_BPF_CFLAGS", "PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(venv / "bin" / "gateway"), "--help"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0 and "attach" in r.stdout
    probe = ("from gateway.xdp.program import import_bcc, find_kernel_headers, bpf_source\n"
             "import gateway._native, sys\n"
             "print(import_bcc().__name__, find_kernel_headers()[0], bpf_source())")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bcc /usr/src/linux-headers-")
    assert str(venv) in r.stdout  # the XDP program shipped inside the package

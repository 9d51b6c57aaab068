"""The XDP program's loading path: bcc compiles in a child process, the daemon gets fds.

What must hold: the daemon never maps bcc or LLVM, the compiler process is gone once
XdpProgram() returns, the fds that arrive are the program and the maps the C source
declares (the held map still mmap-able and shared with the kernel's copy), and a
compiler that fails, dies or lies is refused with one clear XdpError and no fd left.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from gateway.testing.netns import topology
from gateway.xdp import link, maps, program
from gateway.xdp.program import MAPS, XdpError, XdpProgram, expected_maps, prog_info

BCC_LIBS = ("libbcc", "libLLVM", "libclang")


def _skip_without_bcc():
    try:
        program.bcc_available()
        program.find_kernel_headers()
    except XdpError as e:
        pytest.skip(str(e))


def mapped_libs(pid: int | str = "self") -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {os.path.basename(line.split()[5]) for line in f if len(line.split()) > 5}


def children(pid: int | str = "self") -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_the_daemon_maps_no_bcc_and_keeps_no_child(env):
    topo, d = env
    pid = d.proc.pid
    d.ok("attach", "vm0", topo.nic, "--json")
    prog_id, _ = link.xdp_state(topo.nic)
    info = prog_info(prog_id)
    assert info["name"] == "gateway_xdp" and set(MAPS) <= info["map_names"]
    libs = mapped_libs(pid)
    assert not [lib for lib in libs if lib.startswith(BCC_LIBS)], libs
    assert any(lib.startswith("libbpf.so") for lib in libs)  # maps and attach go through it
    assert children(pid) == []  # the compiler process came and went
    stats = json.loads(d.ok("stats", "vm0", "--json"))  # counters read from the maps
    assert stats["devices"]["vm0"]["drops"]["xdp_no_socket"] == 0


def test_the_fds_that_arrive_are_the_program_and_its_maps():
    _skip_without_bcc()
    before, had_bcc = open_fds(), "bcc" in sys.modules  # other tests here may import it
    with topology() as topo:
        prog = XdpProgram(topo.nic, max_devices=4, max_queues=2)
        try:
            assert children() == [] and ("bcc" in sys.modules) == had_bcc
            assert maps.prog_type_and_name(prog._prog_fd) == (maps.PROG_XDP, "gateway_xdp")
            want = expected_maps(4, 2)
            for name in MAPS:
                i = maps.map_info(prog._maps[name].fd)
                assert (i["name"], i["type"], i["key_size"], i["value_size"],
                        i["max_entries"]) == (name, *want[name])
            # the program, the maps and the dup Python's mmap keeps of held's: nothing else
            assert len(open_fds() - before) == 1 + len(MAPS) + 1
            # held: the C bursts' mmap-ed view and the map are the same memory
            prog.held(3, 1)[0] = 41
            raw = prog._maps["held"].lookup((3 * 2 + 1).to_bytes(4, sys.byteorder))
            assert int.from_bytes(raw, sys.byteorder) == 41 == prog.held_count(3, 1)
            prog.reset_held(3, 1)
            assert prog._maps["held"].lookup((7).to_bytes(4, sys.byteorder)) == bytes(8)
            # the maps drive the program once attached
            prog.attach()
            assert link.xdp_state(topo.nic) == (prog.prog_id, prog.mode)
            prog.set_device(2, "02:00:00:00:00:21", 1514, True, vlan=7)
            assert prog.steered_slot("02:00:00:00:00:21", 7) == 2
            assert prog.steered_slot("02:00:00:00:00:21") is None
            prog.remove_device(2, "02:00:00:00:00:21", vlan=7)
            assert prog.steered_slot("02:00:00:00:00:21", 7) is None
            pid = prog.prog_id
        finally:
            prog.close()
        assert link.xdp_state(topo.nic) == (None, None)
        assert prog_info(pid) is None  # no fd held it any more: the kernel freed it
    assert open_fds() == before


def test_a_failing_compile_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    _skip_without_bcc()
    bad = tmp_path / "broken.c"
    bad.write_text("int gateway_xdp(struct xdp_md *ctx) { return not_declared; }\n")
    monkeypatch.setenv("GATEWAY_BPF_SOURCE", str(bad))
    before = open_fds()
    with pytest.raises(XdpError, match=f"^compiling/loading {bad} failed: "):
        XdpProgram("lo", max_devices=2, max_queues=1)
    assert open_fds() == before and children() == []


# A stand-in compiler: argv = package root, socket fd, max devices, max queues.
# It loads a 2-instruction XDP program named gateway_xdp and creates maps with
# libbpf, one of them possibly wrong, and sends them as the real one would.
FAKE = textwrap.dedent("""
    import array, ctypes as ct, json, os, socket, sys
    root, fd, md, mq, how = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
        os.environ["FAKE_HOW"]
    s = socket.socket(fileno=fd)
    if how == "silent":
        os._exit(3)
    if how == "hang":
        import time
        time.sleep(120)
    if how == "garbage":
        s.sendmsg([b"{not json"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [0, 1]))])
        sys.exit(0)
    bpf = ct.CDLL("libbpf.so.1", use_errno=True)
    bpf.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                   ct.c_uint32, ct.c_void_p]
    bpf.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_char_p,
                                  ct.c_size_t, ct.c_void_p]
    insns = bytes.fromhex("b700000002000000" "9500000000000000")  # r0 = XDP_PASS; exit
    prog = bpf.bpf_prog_load(6, b"gateway_xdp", b"GPL", insns, 2, None)
    want = json.loads(os.environ["FAKE_MAPS"])
    fds = [prog]
    for name in json.loads(os.environ["FAKE_ORDER"]):
        t, k, v, n = want[name]
        if how == "wrong" and name == "devices":
            v = 8
        opts = (ct.c_uint32 * 12)()  # struct bpf_map_create_opts: size_t sz @0, map_flags @28
        opts[0], opts[7] = 48, 1024 if name == "held" else 0
        fds.append(bpf.bpf_map_create(t, name.encode(), k, v, n, opts))
    assert min(fds) >= 0, fds
    s.sendmsg([json.dumps({"maps": json.loads(os.environ["FAKE_ORDER"])}).encode()],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
""")


@pytest.mark.parametrize("how, why", [
    ("silent", "^the XDP compiler process exited with 3 without an answer"),
    ("garbage", "^the XDP compiler process sent no JSON"),
    ("hang", r"^the XDP compiler process \(pid \d+\) did not answer within 2 s$"),
    ("wrong", r"^map devices: the kernel says 'devices' \(type, key, value, entries\) "
              r"\(2, 4, 8, 2\), expected \(2, 4, 16, 2\)$"),
])
def test_a_compiler_that_dies_or_lies_is_refused(monkeypatch, how, why):
    monkeypatch.setattr(program, "_CHILD", FAKE)
    if how == "hang":
        monkeypatch.setattr(program, "COMPILE_TIMEOUT", 2.0)
    monkeypatch.setenv("FAKE_HOW", how)
    monkeypatch.setenv("FAKE_MAPS", json.dumps(expected_maps(2, 1)))
    monkeypatch.setenv("FAKE_ORDER", json.dumps(list(MAPS)))
    before = open_fds()
    with pytest.raises(XdpError, match=why):
        XdpProgram("lo", max_devices=2, max_queues=1)
    assert open_fds() == before and children() == []


def test_a_truthful_stand_in_compiler_is_accepted(monkeypatch):
    """The same stand-in, honest: so the refusals above are for the lie alone."""
    monkeypatch.setattr(program, "_CHILD", FAKE)
    monkeypatch.setenv("FAKE_HOW", "honest")
    monkeypatch.setenv("FAKE_MAPS", json.dumps(expected_maps(2, 1)))
    monkeypatch.setenv("FAKE_ORDER", json.dumps(list(MAPS)))
    with XdpProgram("lo", max_devices=2, max_queues=1) as prog:
        assert prog.counters(1) == dict.fromkeys(program.COUNTERS, 0)
        prog.held(1, 0)[0] = 5
        assert prog.held_count(1, 0) == 5

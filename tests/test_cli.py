"""The operator's entry points that need no daemon of their own."""

import subprocess
import sys

import pytest
from click.testing import CliRunner
from pyroute2 import netns

from gateway.cli import main


def test_demo_runs_to_completion_and_leaves_nothing_behind():
    p = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--no-wait"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert "the guest's copy of demo.bin matches" in out
    assert "3 packets transmitted, 3 packets received" in out
    assert "vm0: rx" in out and out.rstrip().endswith("demo ok")
    # Its namespaces and links carry its pid (gateway/testing/netns.py): none
    # may be left; other runs' may come and go meanwhile.
    mine = f"gwt{p.pid % 100000}"
    assert not [n for n in netns.listnetns() if n.startswith(mine)]
    assert not [n for n in link_names() if n.startswith(mine)]
    assert subprocess.run(["pgrep", "-f", "qemu-system-x86_64.*gateway-demo-"]).returncode == 1


def link_names() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [lk.get_attr("IFLA_IFNAME") for lk in ipr.get_links()]


def test_bad_input_is_one_line_and_nonzero():
    result = CliRunner().invoke(main, ["stats", "--interval", "0"])
    assert result.exit_code == 2
    assert "Invalid value for '--interval'" in result.output


@pytest.mark.parametrize("cpus, why", [("0-x", "not a CPU number"), ("3-1", "not a CPU range"),
                                       ("4096", "not available")])
def test_daemon_bad_cpus_is_one_line_and_nonzero(cpus, why, tmp_path):
    result = CliRunner().invoke(main, ["daemon", "--cpus", cpus, "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert why in result.output and len(result.output.strip().splitlines()) == 1


def test_daemon_bad_busy_poll_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["daemon", "--busy-poll-us", "-5", "--run-dir",
                                       str(tmp_path)])
    assert result.exit_code == 2 and "--busy-poll-us" in result.output


@pytest.mark.parametrize("flags, want", [([], True), (["--no-wake-ahead"], False),
                                         (["--wake-ahead"], True)])
def test_daemon_wake_ahead_switch_reaches_the_daemon(flags, want, tmp_path, monkeypatch):
    import gateway.cli
    import gateway.daemon

    seen = {}
    monkeypatch.setattr(gateway.cli, "preflight", lambda: None)
    monkeypatch.setattr(gateway.daemon, "run", lambda *a, **kw: seen.update(kw))
    result = CliRunner().invoke(main, ["daemon", *flags, "--run-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["wake_ahead"] is want


def test_daemon_wake_ahead_takes_no_value(tmp_path):
    result = CliRunner().invoke(main, ["daemon", "--wake-ahead", "maybe", "--run-dir",
                                       str(tmp_path)])
    assert result.exit_code == 2

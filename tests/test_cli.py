"""The operator's entry points."""

from click.testing import CliRunner

from gateway.cli import main


def test_demo_moves_frames_both_ways_and_reports_counters():
    result = CliRunner().invoke(main, ["demo", "--frames", "500", "--size", "100"])
    assert result.exit_code == 0, result.output
    assert "500 frames of 100 B intact" in result.output
    assert "'rx_packets': 500" in result.output and "'tx_packets': 500" in result.output
    assert result.output.rstrip().endswith("demo ok")


def test_bad_input_is_one_line_and_nonzero():
    result = CliRunner().invoke(main, ["demo", "--size", "5"])
    assert result.exit_code == 2
    assert "Invalid value for '--size'" in result.output

"""Prometheus exposition of the same counters `gateway stats` shows.

A custom collector asks the Gateway at scrape time, so the numbers are
exactly what `stats --json` would print at that moment. Besides the counters:
`gateway_build_info{version}`, `gateway_device_info{device,nic,mac,vlan,mode,socket}`
(value 1: what `gateway list` says of each device, to join on `device`) and
`gateway_device_state{device,state}`, one series per state with 1 for the
current one (Prometheus' enum pattern, so a state that ends shows as a 0
rather than as a series that vanishes).
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from gateway.api import Gateway

# Gateway.describe()'s states: waiting for a front-end, running, broken by its
# guest, pending (its NIC is missing)
STATES = ("waiting", "running", "broken", "pending")


def version() -> str:
    try:
        return metadata.version("gateway")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class GatewayCollector:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.version = version()

    def collect(self):
        yield from self.info()
        with self.gw.lock:  # one moment: the same devices in every family
            s = self.gw.stats()["devices"]
            devices = self.gw.list()
        dev_info = GaugeMetricFamily("gateway_device_info",
                                     "a device's NIC, MAC, VLAN (0: untagged), socket mode "
                                     "(server: the gateway listens) and socket path",
                                     labels=["device", "nic", "mac", "vlan", "mode", "socket"])
        state = GaugeMetricFamily("gateway_device_state",
                                  "1 for the state a device is in, 0 for the others: waiting "
                                  "(for its front-end), running, broken (by its guest), "
                                  "pending (its NIC is missing)", labels=["device", "state"])
        for d in devices:
            dev_info.add_metric([d["name"], d["iface"], d["mac"], str(d["vlan"]), d["mode"],
                                 d["socket"]], 1)
            known = STATES if d["state"] in STATES else (*STATES, d["state"])  # never hidden
            for st in known:
                state.add_metric([d["name"], st], 1 if d["state"] == st else 0)
        yield dev_info
        yield state
        fams = {
            key: CounterMetricFamily(f"gateway_{key}", f"{key.replace('_', ' ')} per device",
                                     labels=["device"])
            for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
        }
        drops = CounterMetricFamily("gateway_drops", "frames dropped, by reason",
                                    labels=["device", "reason"])
        offload = CounterMetricFamily("gateway_offload",
                                      "checksums completed, GSO frames and their segments, "
                                      "received checksums vouched for", labels=["device", "kind"])
        broken = CounterMetricFamily("gateway_device_broken",
                                     "times a guest's rings lied and the device was marked broken",
                                     labels=["device"])
        log_miss = CounterMetricFamily("gateway_log_miss",
                                       "guest pages written during a live migration that the "
                                       "migration's dirty log was too small to mark",
                                       labels=["device"])
        for dev, c in s.items():
            for key, fam in fams.items():
                fam.add_metric([dev], c[key])
            for reason, v in c["drops"].items():
                drops.add_metric([dev, reason], v)
            for kind, v in c["offload"].items():
                offload.add_metric([dev, kind], v)
            broken.add_metric([dev], c["broken_total"])
            log_miss.add_metric([dev], c["log_miss"])
        yield from fams.values()
        yield drops
        yield offload
        yield broken
        yield log_miss

    def info(self):
        build = GaugeMetricFamily("gateway_build_info", "the gateway's version (value 1)",
                                  labels=["version"])
        build.add_metric([self.version], 1)
        yield build


def serve_metrics(gw: Gateway, listen: str):
    """Start the HTTP endpoint on HOST:PORT; returns (server, thread)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics-listen {listen!r}: expected HOST:PORT")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    return start_http_server(int(port), addr=host.strip("[]"), registry=registry)

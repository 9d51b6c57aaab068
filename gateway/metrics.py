"""Prometheus exposition of the same counters `gateway stats` shows.

A custom collector asks the Gateway at scrape time, so the numbers are
exactly what `stats --json` would print at that moment.
"""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily

from gateway.api import Gateway


class GatewayCollector:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self):
        s = self.gw.stats()["devices"]
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


def serve_metrics(gw: Gateway, listen: str):
    """Start the HTTP endpoint on HOST:PORT; returns (server, thread)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics-listen {listen!r}: expected HOST:PORT")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    return start_http_server(int(port), addr=host.strip("[]"), registry=registry)

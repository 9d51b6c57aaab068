"""The device registry: the seed's device list, callbacks and feature API.

Maps the seed's public calls onto Python:
  rte_vhost_driver_callback_register  → Registry.register_callbacks
  rte_vhost_feature_get/enable/disable → Registry.feature_get/enable/disable
  rte_vhost_enable_guest_notification  → VhostDevice.enable_guest_notification
The global feature set is what new devices offer; a device keeps the offer it
was created with, so a front-end that reconnects sees the same bits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

from gateway.datapath.port import Port
from gateway.vhost.device import VhostDevice
from gateway.virtio import features as vf

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

Callback = Callable[[VhostDevice], None]


class Registry:
    def __init__(self) -> None:
        self._devices: dict[str, VhostDevice] = {}
        self._features = vf.SUPPORTED_FEATURES
        self._on_new: Callback | None = None
        self._on_destroy: Callback | None = None

    # -- callbacks ----------------------------------------------------------------

    def register_callbacks(
        self, on_new_device: Callback | None = None, on_destroy_device: Callback | None = None
    ) -> None:
        self._on_new, self._on_destroy = on_new_device, on_destroy_device

    def notify(self, dev: VhostDevice, running: bool) -> None:
        """Called by a device when its first queue pair starts or stops."""
        cb = self._on_new if running else self._on_destroy
        if cb is None:
            return
        try:
            cb(dev)
        except Exception:
            log.exception("%s: %s callback failed", dev.name,
                          "new_device" if running else "destroy_device")

    # -- features -------------------------------------------------------------------

    def feature_get(self) -> int:
        return self._features

    def feature_enable(self, mask: int) -> None:
        """Only bits this back-end supports may be enabled (the seed's rule)."""
        extra = mask & ~vf.SUPPORTED_FEATURES
        if extra:
            raise ValueError(f"unsupported features: {', '.join(vf.names(extra))}")
        self._features |= mask

    def feature_disable(self, mask: int) -> None:
        self._features &= ~mask

    # -- devices --------------------------------------------------------------------

    def create(self, name: str, port: Port, *, queue_pairs: int = 1, max_mtu: int = 65535
               ) -> VhostDevice:
        if not NAME_RE.match(name):
            raise ValueError(
                f"bad device name {name!r}: use 1-32 letters, digits, '_', '.', '-'"
            )
        if name in self._devices:
            raise ValueError(f"device {name!r} already exists")
        dev = VhostDevice(name, port=port, queue_pairs=queue_pairs, features=self._features,
                          max_mtu=max_mtu, registry=self)
        self._devices[name] = dev
        return dev

    def remove(self, name: str) -> VhostDevice:
        dev = self._devices.pop(name, None)
        if dev is None:
            raise KeyError(f"no device {name!r}")
        return dev

    def get(self, name: str) -> VhostDevice:
        try:
            return self._devices[name]
        except KeyError:
            raise KeyError(f"no device {name!r}") from None

    def __iter__(self) -> Iterator[VhostDevice]:
        return iter(list(self._devices.values()))

    def __len__(self) -> int:
        return len(self._devices)

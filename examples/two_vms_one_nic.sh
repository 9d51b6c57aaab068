#!/usr/bin/env bash
# Attach two VMs to one NIC and print how to start each. Needs a running daemon
# (sudo gateway daemon, or the systemd unit) and a NIC that is up.
#
#   sudo examples/two_vms_one_nic.sh eth1
#
# Both guests reach the wire and each other (the gateway delivers guest-to-guest
# frames itself: a NIC does not send frames back where they came from).
set -euo pipefail
nic="${1:?usage: $0 NIC}"
for vm in vm0 vm1; do
    gateway attach "$vm" "$nic"
    echo
done
gateway list

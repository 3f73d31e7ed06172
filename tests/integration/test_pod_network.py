"""The pod network's gateway (the bridge the pods reach the apiserver through) keeps one MAC address
while pods come and go.

An unpinned Linux bridge takes the lowest MAC of its ports, so a pod ending or starting could move
the gateway to another address while the other pods still had the old one cached: their requests to
the apiserver then went nowhere for 25-70 s (seen as a rank 0's final status write stalling after its
peer's pod ended). Each case runs in a private network namespace, so the host's real bridge and the
pods on it are never touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from localcluster.node import network

SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from localcluster.node import network

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def add_port(name, mac):
        # a pod's host-side veth, with a chosen address
        ip("link", "add", name, "address", mac, "type", "veth", "peer", "name", name + "p")
        ip("link", "set", name, "master", network.BRIDGE, "up")

    seen = {}
    if sys.argv[1] == "existing":
        # a bridge made by a daemon that did not pin its address, with a pod plugged in
        ip("link", "add", network.BRIDGE, "type", "bridge")
        add_port("lktesta", "02:00:00:00:00:05")
        seen["before ensure_bridge"] = network.bridge_mac()
    network.ensure_bridge()
    seen["after ensure_bridge"] = network.bridge_mac()
    add_port("lktestb", "02:00:00:00:00:01")    # lower than any address the bridge could hold
    seen["a pod with a lower MAC started"] = network.bridge_mac()
    ip("link", "delete", "lktestb")
    seen["that pod ended"] = network.bridge_mac()
    print(json.dumps(seen))
""")


@pytest.mark.parametrize("bridge", ["fresh", "existing"])
def test_the_gateway_keeps_its_mac_address_while_pods_come_and_go(bridge):
    result = subprocess.run(["unshare", "--net", sys.executable, "-c", SCRIPT, bridge],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    if bridge == "existing":
        assert seen.pop("before ensure_bridge") == "02:00:00:00:00:05"  # the kernel's choice: its port's
    assert seen == dict.fromkeys(seen, network.BRIDGE_MAC), seen

"""Reading the facts a booted VM's checks gather, without a VM."""

from __future__ import annotations

import json

from racker.checks.guest import Fact, Facts, networkd_dhcp_addresses, networkd_dhcp_dns

# The shape of `networkctl --json=short status` (networkd-json.c: Address as bytes, ConfigSource "DHCPv4"), cut down.
STATUS = {
    "Interfaces": [
        {"Name": "lo", "Addresses": [{"Family": 2, "Address": [127, 0, 0, 1], "ConfigSource": "static"}]},
        {
            "Name": "ens3",
            "Addresses": [
                {"Family": 2, "Address": [10, 0, 2, 15], "PrefixLength": 24, "ConfigSource": "DHCPv4"},
                {"Family": 10, "Address": [254, 128] + [0] * 14, "ConfigSource": "foreign"},
            ],
        },
    ]
}


def test_dhcp_addresses_come_from_networkd_json() -> None:
    assert networkd_dhcp_addresses(STATUS) == {"10.0.2.15"}
    assert networkd_dhcp_addresses(None) == set()
    assert networkd_dhcp_addresses({"Interfaces": [{"Addresses": [{"Address": [10, 0, 2, 15], "ConfigSource": "static"}]}]}) == set()


def facts(**outputs: str) -> Facts:
    found = Facts(
        {name: Fact("", 1) for name in ("networkd_leases", "networkd_json", "dhclient_leases", "resolv_conf", "resolved_servers")}
    )
    found.update({name: Fact(out, 0) for name, out in outputs.items()})
    return found


def test_dhcp_dns_comes_from_networkds_leases_or_json_or_dhclients() -> None:
    status = {"Interfaces": [{"Name": "ens3", "DNS": [{"Family": 2, "Address": [10, 0, 2, 3], "ConfigSource": "DHCPv4"},
                                                      {"Family": 2, "Address": [9, 9, 9, 9], "ConfigSource": "static"}]}]}  # fmt: skip
    assert networkd_dhcp_dns(status) == {"10.0.2.3"}
    assert networkd_dhcp_dns(None) == set()
    assert facts(networkd_leases="ADDRESS=10.0.2.15\nDNS=10.0.2.3 10.0.2.4").dhcp_dns() == {"10.0.2.3", "10.0.2.4"}
    assert facts(networkd_leases="ADDRESS=10.0.2.15").dhcp_leases() == {"10.0.2.15"}
    assert facts(networkd_json=json.dumps(status)).dhcp_dns() == {"10.0.2.3"}
    assert facts(dhclient_leases="lease {\n  option domain-name-servers 10.0.2.3, 10.0.2.5;\n}").dhcp_dns() == {"10.0.2.3", "10.0.2.5"}


def test_nameservers_in_use_go_through_resolveds_stub_to_its_own() -> None:
    direct = "lrwxrwxrwx 1 root root 32 /etc/resolv.conf -> /run/systemd/resolve/resolv.conf\nnameserver 10.0.2.3\nsearch ."
    assert facts(resolv_conf=direct).nameservers_in_use() == ["10.0.2.3"]
    stub = facts(resolv_conf="nameserver 127.0.0.53\noptions edns0", resolved_servers="nameserver 10.0.2.3")
    assert stub.nameservers_in_use() == ["10.0.2.3"]
    assert facts(resolv_conf="nameserver 10.255.255.53").nameservers_in_use() == ["10.255.255.53"]

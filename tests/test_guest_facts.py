"""Reading the facts a booted VM's checks gather, without a VM."""

from __future__ import annotations

from racker.checks.guest import networkd_dhcp_addresses

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

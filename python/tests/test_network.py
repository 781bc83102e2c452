"""The agent binds Gloo to the interface of this host's address."""
from ft_torch.agent import _interface_of


def test_interface_of_loopback_is_lo():
    assert _interface_of("127.0.0.1") == "lo"


def test_interface_of_an_address_no_interface_holds_is_none():
    # 192.0.2.0/24 (TEST-NET-1) past .250 is held by no interface here.
    assert _interface_of("192.0.2.254") is None

"""gateway/counter_specs.py: config bindings to engine specs."""

from __future__ import annotations

from decimal import Decimal

from connectors.modbus.config import ModbusTagConfig
from gateway.config import CounterConfig
from gateway.counter_specs import counter_binding, counter_type


def cfg(**kw: object) -> CounterConfig:
    return CounterConfig(connector="mb", **kw)


def test_equal_bindings_share_one_spec_and_different_ones_do_not():
    """3,333 machines with the same counters hold one CounterBinding per distinct counter, not one per machine; a
    difference in any field gives its own."""
    u16 = ModbusTagConfig(address=0, data_type="uint16")
    a = counter_binding("good", cfg(max_rate=50), u16)
    assert counter_binding("good", cfg(max_rate=50), ModbusTagConfig(address=7, data_type="uint16")) is a
    assert a.spec.modulus == 2**16 and a.scale == Decimal(1)
    for other in (counter_binding("scrap", cfg(max_rate=50), u16), counter_binding("good", cfg(max_rate=60), u16),
                  counter_binding("good", cfg(max_rate=50, scale=Decimal(2)), u16),
                  counter_binding("good", cfg(max_rate=50), ModbusTagConfig(address=0, data_type="uint32"))):
        assert other is not a and other != a
    assert counter_type(cfg(bits=16)) is counter_type(cfg(bits=16)) and counter_type(cfg(bits=16)) != counter_type(cfg())

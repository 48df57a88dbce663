

def test_loaded_document_is_copied_with_new_strings():
    """load_config validates a copy of the YAML document with new dicts, lists and strings (the loader's strings
    keep its node graph's memory in use); the copy is equal, and shares no string or container with the original."""
    from gateway.config import _fresh

    doc = {"gateway": {"id": "gw-1", "tags": ["a", "b"]}, "n": 3, "f": 1.5, "t": True, "none": None,
           "machines": [{"id": "m1", "counters": {"good": {"address": 0}}}]}
    copy = _fresh(doc)
    assert copy == doc
    assert copy["gateway"]["id"] is not doc["gateway"]["id"] and copy["gateway"]["tags"][0] is not doc["gateway"]["tags"][0]
    assert next(iter(copy["machines"][0])) is not next(iter(doc["machines"][0]))  # keys too
    assert copy["machines"] is not doc["machines"] and copy["machines"][0] is not doc["machines"][0]


def test_equal_bindings_of_machines_are_one_frozen_object_and_keep_their_own_addresses():
    """parse_config shares equal bindings and reporting sections between machines (config memory at 10,000 tags);
    each binding's address stays its own (``tag_address``), a state's value map is not shared, and a shared model
    cannot be changed through one machine."""
    import pydantic
    import pytest

    from gateway.config import parse_config
    from tests.e2e import IDENT

    def machine(i: int, state_values: dict[str, str]) -> dict:
        return {"id": f"m{i}", "reporting": {"interval_s": 2},
                "counters": {"good": {"connector": "plc", "address": 3 * i, "data_type": "uint32"},
                             "scrap": {"connector": "plc", "address": 3 * i + 2, "data_type": "uint16",
                                       "max_rate": 5 if i == 2 else 50}},
                "state": {"connector": "plc", "address": 1000 + i, "values": state_values}}

    cfg = parse_config({"gateway": IDENT, "connectors": [{"type": "modbus", "id": "plc", "host": "10.0.0.5"}],
                        "machines": [machine(i, {"1": "running", "0": "idle" if i else "stopped"}) for i in range(3)]})
    m0, m1, m2 = cfg.machines
    assert m0.counters["good"] is m1.counters["good"] is m2.counters["good"]
    assert m0.counters["scrap"] is m1.counters["scrap"] and m2.counters["scrap"] is not m0.counters["scrap"]
    assert (m0.counters["scrap"].max_rate, m2.counters["scrap"].max_rate) == (50, 5)
    assert m0.reporting is m2.reporting and m0.reporting.interval_s == 2
    assert m0.state is not m1.state and (m0.state.values["0"], m1.state.values["0"]) == ("stopped", "idle")
    assert [(cfg.tag_address(m, "good").address, cfg.tag_address(m, "good").data_type,
             cfg.tag_address(m, "scrap").address, cfg.tag_address(m, "scrap").data_type, cfg.tag_address(m, "state").address)
            for m in ("m0", "m1", "m2")] == [(0, "uint32", 2, "uint16", 1000), (3, "uint32", 5, "uint16", 1001),
                                             (6, "uint32", 8, "uint16", 1002)]
    with pytest.raises(pydantic.ValidationError):
        m0.counters["good"].max_rate = 1
    with pytest.raises(pydantic.ValidationError):
        m0.reporting.interval_s = 1

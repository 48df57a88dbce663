

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

"""Counter engine rules, table-driven: (value, good, t) samples -> total counted, outcomes."""

import pytest

from mappings.counters import CounterSpec, CounterState, step

U16 = CounterSpec("good", modulus=2**16, max_rate=10)
U32 = CounterSpec("good", modulus=2**32, max_rate=10)
S16 = CounterSpec("good", modulus=2**16, signed=True, max_rate=10)


def run(spec, samples):
    st = CounterState()
    results = [step(spec, st, v, good, t) for v, good, t in samples]
    return sum(r.delta for r in results), [r.outcome for r in results], st


CASES = {
    "first value is a baseline": (U32, [(1000, True, 0)], 0, ["baseline"]),
    "increase": (U32, [(10, True, 0), (15, True, 1)], 5, ["baseline", "increase"]),
    "rollover at 2^16": (U16, [(65530, True, 0), (3, True, 1)], 9, ["baseline", "rollover"]),
    "rollover at 2^32": (U32, [(2**32 - 2, True, 0), (1, True, 1)], 3, ["baseline", "rollover"]),
    "signed 16-bit wraps to negative": (S16, [(32766, True, 0), (-32767, True, 1)], 3, ["baseline", "increase"]),
    "rollover exactly to zero is not a glitch": (U16, [(65535, True, 0), (0, True, 1), (2, True, 2)], 3,
                                                 ["baseline", "rollover", "increase"]),
    "reset (implausible rollover)": (U16, [(1000, True, 0), (10, True, 1)], 10, ["baseline", "reset"]),
    "transient zero glitch": (U32, [(1000, True, 0), (0, True, 1), (1002, True, 2)], 2,
                              ["baseline", "held_zero", "glitch"]),
    "zero then smaller value is a reset": (U32, [(1000, True, 0), (0, True, 1), (10, True, 2)], 10,
                                           ["baseline", "held_zero", "reset"]),
    "implausible jump is held": (U32, [(10, True, 0), (100_000, True, 1), (100_003, True, 2)], 3,
                                 ["baseline", "jump", "increase"]),
    "bad samples never move the baseline": (U32, [(10, True, 0), (0, False, 1), (99, False, 2), (14, True, 3)], 4,
                                            ["baseline", "bad", "bad", "increase"]),
    "stale sample ignored": (U32, [(10, True, 5), (8, True, 4), (12, True, 6)], 2, ["baseline", "stale", "increase"]),
    "non-integer value rejected": (U32, [(10, True, 0), (10.5, True, 1), ("x", True, 2), (11, True, 3)], 1,
                                   ["baseline", "invalid", "invalid", "increase"]),
    "reset_on_read counts every value": (CounterSpec("good", mode="reset_on_read"), [(3, True, 0), (0, True, 1), (4, True, 2)],
                                         7, ["delta", "none", "delta"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_counter_rules(name):
    spec, samples, expected_total, expected_outcomes = CASES[name]
    total, outcomes, _ = run(spec, samples)
    assert outcomes == expected_outcomes
    assert total == expected_total


def test_gateway_down_long_allows_rollover():
    # 16-bit counter, 10/s max: 2 hours later a wrap is plausible
    total, outcomes, _ = run(U16, [(60000, True, 0), (500, True, 7200)])
    assert outcomes == ["baseline", "rollover"] and total == 500 + 65536 - 60000


def test_state_roundtrip():
    _, _, st = run(U32, [(10, True, 0), (0, True, 1)])
    again = CounterState.from_dict(st.to_dict())
    assert again == st and again.held_zero

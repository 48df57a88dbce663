"""`edge-gateway validate`: each broken config in tests/config_cases/ must be rejected with the file, the field
path and what is expected. expected.txt holds one `path<TAB>message fragment` line per required problem."""

from pathlib import Path

import pytest

from gateway.cli import main

CASES = sorted(p for p in (Path(__file__).parent / "config_cases").iterdir() if p.is_dir())
EXAMPLES = sorted((Path(__file__).parents[1] / "config" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_config_is_rejected_with_field_path(case, capsys):
    cfg = case / "config.yaml"
    rc = main(["validate", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    for expected in (case / "expected.txt").read_text().strip().splitlines():
        path, fragment = expected.split("\t")
        hits = [ln for ln in lines if ln.startswith(f"{cfg}:") and f": {path}: " in ln]
        assert hits, f"no problem reported at {path!r}; got:\n{err}"
        assert any(fragment in h for h in hits), f"{path}: expected {fragment!r} in:\n" + "\n".join(hits)


def test_enough_broken_configs():
    assert len(CASES) >= 10


def test_line_numbers_point_at_the_field(capsys):
    case = next(c for c in CASES if c.name == "missing_address")
    main(["validate", str(case / "config.yaml")])
    err = capsys.readouterr().err
    assert f"{case / 'config.yaml'}:10: machines[1].counters.scrap.address" in err, err


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_are_valid(example, capsys):
    assert main(["validate", str(example)]) == 0, capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the file" in capsys.readouterr().err

"""`kyphowatch keys` takes --db after the action, as every other command does (user audit)."""

from __future__ import annotations

import pytest

from pipelines.cli import main


@pytest.mark.parametrize(
    "argv", [["keys", "check", "--db", "{url}"], ["keys", "--db", "{url}", "check"]]
)
def test_keys_check_reads_the_warehouse_named_on_either_side(argv, tmp_path, capsys):
    missing = tmp_path / "none.db"
    code = main([a.format(url=f"sqlite:///{missing}") for a in argv])
    # exit 3 with the path: the warehouse named was read (a refused argument exits 2)
    assert code == 3
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()

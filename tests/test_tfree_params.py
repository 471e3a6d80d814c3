"""The T-FREE parameter table counts what the modules hold (2 v h for untied embedding + head)."""

import pytest

from bench import tfree_params


@pytest.mark.parametrize(("v", "h"), [(8000, 1024), (32000, 4096), (3, 5)])
def test_counts_are_embedding_plus_head(v, h):
    assert tfree_params.tfree_params(v, h) == 2 * v * h
    assert tfree_params.subword_params(v, h) == 2 * v * h


def test_table_savings_and_cli(capsys):
    out = tfree_params.table([4096], [8000], [64000, 128000])
    row = next(r for r in out.splitlines() if "T-FREE" in r)
    assert "87.5%" in row and "93.8%" in row  # 1 - 8/64, 1 - 8/128
    assert tfree_params.main(["--hidden", "16", "--tfree", "8", "--subword", "64"]) == 0
    assert "| 16 | T-FREE | 8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tfree_params.main(["--hidden", "0"])

"""`python -m benchmarks.channel_split`: a CSPNet shrunk through its channel splits."""

from benchmarks import channel_split


def test_quick_run_shrinks_more_with_the_splits_followed(capsys):
    assert channel_split.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "27 channel groups gated, 8 of them cut by a split" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    params = {name: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    assert params["split-aware"] < params["splits whole"] < params["dense"]
    for name in ("split-aware", "splits whole"):  # each is the masked model it came from
        assert float(rows[name][3]) <= 1e-4

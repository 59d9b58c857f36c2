"""Numbers a command cannot use are refused by argparse, before any work, in one message."""
from __future__ import annotations

import pytest

from echopulse.stream.cli import main


@pytest.mark.parametrize("argv, words", [
    (["train", "tokenizer", "--cache", "-1", "--out", "x"], "cache must be between 0 and 10,000,000, got -1"),  # once: one clip, silently
    (["evaluate", "generator", "--leads", "13"], "leads must be between 1 and 12, got 13"),  # once: a traceback after loading
    (["replay", "x.csv", "--out", "x.npz", "--fs", "0.5"], "fs must be between 50 and 20,000, got 0.5"),
])
def test_out_of_range_numbers_are_refused_up_front(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err

"""core/ship_check.py: retrained weights replace the shipped ones only when every figure holds."""
from __future__ import annotations

import copy
import json

import pytest

from echopulse.core import ship_check


@pytest.fixture(scope="module")
def shipped():
    return (json.loads(ship_check.SHIPPED_TOKENIZER.read_text()), json.loads(ship_check.SHIPPED_GENERATOR.read_text()))


def better(shipped):
    """A candidate a little better than the shipped weights everywhere."""
    tok, gen = copy.deepcopy(shipped[0]), copy.deepcopy(shipped[1])
    tok["ssim"] += 0.02
    tok["mse"] *= 0.95
    for mode in ("image", "loop"):
        gen["summary"][mode]["ef_vs_true_video"]["mae"] -= 0.2
    return tok, gen


def test_a_candidate_better_everywhere_ships(shipped):
    result = ship_check.verdict(*better(shipped), *shipped)
    assert result["ship"] and result["failed"] == []
    assert "ship it" in ship_check.format_table(result)


def test_the_shipped_weights_do_not_replace_themselves(shipped):
    """Same figures: the tokenizer is not better, and a new encoder is only worth a better one."""
    assert ship_check.verdict(*shipped, *shipped)["failed"] == ["tokenizer SSIM"]


@pytest.mark.parametrize("change, failed", [
    # the session-9 CPU retrain: loop priming better, one-frame ED timing at 86 %
    (lambda g: g["summary"]["image"].update(ed_within_1_frame=0.86), "one frame: ED within 1 frame"),
    (lambda g: g["summary"]["image"]["ef_vs_true_video"].update(mae=9.54), "one frame: EF MAE"),
    (lambda g: g["summary"]["loop"].update(ssim=0.55), "reference loop: SSIM"),
    (lambda g: g["summary"]["hr_tracking"].update(follows_within_one_beat=0.7), "HR jump followed within one beat"),
])
def test_one_figure_lost_keeps_the_shipped_weights(shipped, change, failed):
    tok, gen = better(shipped)
    change(gen)
    result = ship_check.verdict(tok, gen, *shipped)
    assert not result["ship"] and result["failed"] == [failed]
    assert failed in ship_check.format_table(result)


def test_the_command_writes_the_verdict_and_names_a_missing_figure(tmp_path, shipped, capsys):
    tok, gen = better(shipped)
    (tmp_path / "tok.json").write_text(json.dumps(tok))
    (tmp_path / "gen.json").write_text(json.dumps(gen))
    argv = ["--tokenizer", str(tmp_path / "tok.json"), "--generator", str(tmp_path / "gen.json")]
    assert ship_check.main([*argv, "--out", str(tmp_path / "verdict.json")]) == 0
    assert json.loads((tmp_path / "verdict.json").read_text())["ship"] is True
    del gen["summary"]["hr_tracking"]
    (tmp_path / "gen.json").write_text(json.dumps(gen))
    with pytest.raises(SystemExit, match="no summary/hr_tracking/follows_within_one_beat in the report"):
        ship_check.main(argv)


def test_losing_exactly_the_allowed_two_subjects_passes(shipped):
    """The slack is two of 20 subjects: 11/20 -> 9/20 is within it (0.55 - 0.1 rounds above 0.45)."""
    tok, gen = better(shipped)
    shipped_gen = copy.deepcopy(shipped[1])
    shipped_gen["summary"]["hr_tracking"]["follows_within_one_beat"] = 11 / 20
    gen["summary"]["hr_tracking"]["follows_within_one_beat"] = 9 / 20
    assert ship_check.verdict(tok, gen, shipped[0], shipped_gen)["ship"]
    gen["summary"]["hr_tracking"]["follows_within_one_beat"] = 8 / 20
    assert ship_check.verdict(tok, gen, shipped[0], shipped_gen)["failed"] == ["HR jump followed within one beat"]


@pytest.mark.parametrize("change, failed", [
    # scored on fewer subjects (e.g. a shortened EVAL_GENERATOR) or on the validation seeds
    (lambda t, g: g.update(subjects=g["subjects"][:20]), "generator: the shipped subjects"),
    (lambda t, g: [s.update(seed=s["seed"] + 1_000_000) for s in g["subjects"]], "generator: the shipped subjects"),
    (lambda t, g: t.update(seed=2_000_000), "tokenizer: the shipped clips"),
    (lambda t, g: t.update(clips=20), "tokenizer: the shipped clips"),
])
def test_figures_from_other_subjects_are_not_compared(shipped, change, failed):
    tok, gen = better(shipped)
    change(tok, gen)
    result = ship_check.verdict(tok, gen, *shipped)
    assert not result["ship"] and result["failed"] == [failed]


@pytest.mark.parametrize("change", [
    # EF measured by another segmenter (README: `evaluate generator --segmenter runs/seg`), or
    # the generator given other leads: figures of another ruler or another input
    lambda g: g.update(segmenter="runs/seg"),
    lambda g: g.update(leads=3),
])
def test_figures_measured_another_way_are_not_compared(shipped, change):
    tok, gen = better(shipped)
    change(gen)
    result = ship_check.verdict(tok, gen, *shipped)
    assert not result["ship"] and result["failed"] == ["generator: the shipped measurement"]

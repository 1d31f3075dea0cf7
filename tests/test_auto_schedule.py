"""`medseg auto`'s rule: the candidates a plan offers, the segments of training, the final run
length and the folds a budget allows, the finalists, and the budget's format."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.experiments.auto_schedule import (
    SCREEN,
    Segment,
    candidates,
    clock,
    expected_finalists,
    final_length,
    finalists,
    fold_count,
    parse_budget,
    segments,
)


def test_budget_reads_hours_minutes_seconds_and_days():
    assert parse_budget("00:30:00") == 1800
    assert parse_budget("1:02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    for bad in ("30m", "00:00:00", "1:2", ""):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_clock_is_lightning_max_time_and_never_zero():
    assert clock(3725.9) == "00:01:02:05"
    assert clock(90000) == "01:01:00:00"
    assert clock(0.2) == "00:00:00:01"


def plan(keyhole: bool, lowres: bool) -> SimpleNamespace:
    low = SimpleNamespace(target_spacing=(5.64428, 5.64428, 10.9784)) if lowres else None
    return SimpleNamespace(keyhole=keyhole, lowres_3d=low)


def test_candidates_follow_the_plan_keyhole_drops_full_resolution_3d():
    assert [c.name for c in candidates(None)] == ["2d"]  # 2D images: nothing else to train
    assert [c.name for c in candidates(plan(False, False))] == ["2d", "3d_fullres"]
    keyhole = candidates(plan(True, True), resnet=True)  # type: ignore[arg-type]
    assert [c.name for c in keyhole] == ["2d", "3d_lowres", "resnet_2d"]
    low = keyhole[1]
    assert low.model == "unet3d" and low.grid == "lowres"
    assert low.flags == ("--data.target_spacing", "[5.64428, 5.64428, 10.9784]")
    assert {c.grid for c in keyhole if c.name != "3d_lowres"} == {"plan"}


def test_finalists_are_the_best_and_a_second_only_on_its_grid():
    grids = {"2d": "plan", "3d_fullres": "plan", "3d_lowres": "lowres"}
    # the runner-up on another grid cannot ensemble with the best: the best on its grid goes on with it
    assert finalists({"2d": 0.5, "3d_fullres": 0.7, "3d_lowres": 0.6}, grids) == ["3d_fullres", "2d"]
    assert finalists({"2d": 0.5, "3d_fullres": 0.4, "3d_lowres": 0.6}, grids) == ["3d_lowres"]
    assert finalists({"2d": None, "3d_fullres": 0.1}, grids) == ["3d_fullres", "2d"]  # undefined ranks last
    assert finalists({"2d": 0.3}, grids) == ["2d"]
    two = candidates(plan(False, False))  # type: ignore[arg-type]
    assert expected_finalists(two) == 2
    assert expected_finalists(candidates(plan(True, True))) == 1  # type: ignore[arg-type]


def test_segments_screen_then_continue_then_folds():
    order = [(s.run, s.kind) for s in segments(["2d", "3d"], ["3d", "2d"], 3)]
    assert order == [
        ("2d-f0", "screen"),
        ("3d-f0", "screen"),
        ("3d-f0", "continue"),
        ("2d-f0", "continue"),
        ("3d-f1", "fold"),
        ("2d-f1", "fold"),
        ("3d-f2", "fold"),
        ("2d-f2", "fold"),
    ]
    assert [(s.run, s.kind) for s in segments(["2d"], ["2d"], 2)] == [("2d-f0", "fold"), ("2d-f1", "fold")]
    assert Segment("2d", 0, "screen").key == "2d-f0:screen"


def test_final_length_counts_screens_as_a_quarter_of_a_run():
    todo = segments(["2d", "3d"], ["2d"], 2)  # 2 screens, 1 continuation, 1 fold
    length = final_length(1000.0, todo)
    assert length == pytest.approx(1000 / (2 * SCREEN + (1 - SCREEN) + 1))
    # the finalist's fold-0 run (screen + continuation) is as long as its fold-1 run
    assert SCREEN * length + (1 - SCREEN) * length == pytest.approx(length)


def test_fold_count_is_the_most_folds_whose_runs_reach_min_run():
    names = ["2d", "3d"]
    # 2 screens of a quarter + 2 continuations of three quarters + 2 x (k - 1) folds = 2k final runs
    assert fold_count(names, 2, 5, 10 * 600, 600) == 5
    assert fold_count(names, 2, 5, 9.9 * 600, 600) == 4
    assert fold_count(names, 2, 5, 600, 600) == 1  # even one fold falls short: one fold, shorter runs
    assert fold_count(["2d"], 1, 5, 3 * 600, 600) == 3

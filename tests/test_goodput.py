"""Goodput accounting: the clock's parts add up to the wall-clock, and the sum over restarts moves the
recomputed steps and every restart's start-up into 'lost to restarts'."""
import time

import pytest

from maskjax import goodput


def account(start, last, wall, steps, **parts):
    return {"start_step": start, "seconds": {"wall": wall, "start_step": start, "last_step": last, "steps": steps,
                                             **dict.fromkeys(goodput.PARTS, 0.0), **parts}}


def test_parts_add_up_to_the_wall_clock_and_nested_blocks_leave_start_up():
    clock = goodput.Clock()
    time.sleep(0.02)
    with clock.timing("restore"):
        time.sleep(0.05)
    clock.started_steps()
    with clock.timing("compile"):
        time.sleep(0.03)
    time.sleep(0.04)  # steps
    snap = clock.snapshot(0, 5)
    assert sum(snap[p] for p in (*goodput.PARTS, "steps")) == pytest.approx(snap["wall"], abs=1e-3)
    assert snap["restore"] == pytest.approx(0.05, abs=0.02) and snap["startup"] == pytest.approx(0.02, abs=0.02)
    assert snap["compile"] == pytest.approx(0.03, abs=0.02) and snap["steps"] == pytest.approx(0.04, abs=0.02)
    fractions = clock.fractions(0, 5)
    assert fractions["goodput"] + sum(fractions[f"time/{p}"] for p in goodput.PARTS) == pytest.approx(1.0, abs=1e-3)


def test_summary_moves_recomputed_steps_and_restart_overheads_to_lost():
    runs = [account(0, 10, wall=100.0, steps=80.0, startup=5.0, compile=10.0, checkpoint=5.0),
            # resumed from the checkpoint of step 6: steps 7-10 of the first run are done again
            account(6, 20, wall=60.0, steps=42.0, startup=4.0, restore=2.0, compile=8.0, eval=4.0),
            {"start_step": 0, "time": 1.0}]  # a record written before accounts existed: ignored
    total = goodput.summarize(runs)
    lost = 80.0 * 4 / 10 + 4.0 + 2.0 + 8.0
    assert total["lost"] == pytest.approx(lost)
    assert total["steps"] == pytest.approx(80.0 - 32.0 + 42.0)
    assert total["wall"] == 160.0 and total["runs"] == 2
    assert total["goodput"] == pytest.approx(90.0 / 160.0)
    assert total["startup"] == 5.0 and total["compile"] == 10.0 and total["restore"] == 0.0
    parts = sum(total[k] for k in (*goodput.PARTS, "steps", "lost"))
    assert parts == pytest.approx(total["wall"])
    text = goodput.line(total)
    assert text.startswith("goodput 56.2% of 2m40s over 2 runs: lost to restarts 28.7%, ")
    assert "compile 6.2%" in text and "eval 2.5%" in text


def test_a_run_resumed_past_its_predecessor_loses_no_steps():
    runs = [account(0, 4, wall=10.0, steps=8.0), account(4, 8, wall=10.0, steps=8.0, startup=1.0)]
    total = goodput.summarize(runs)
    assert total["lost"] == pytest.approx(1.0) and total["steps"] == 16.0
    assert goodput.summarize([{"start_step": 0}]) is None

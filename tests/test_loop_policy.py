"""The training loop's decisions (cadence, preemption, non-finite steps) and its fault-injection wrappers,
checked directly, without running a loop: the end-to-end behaviour is in test_faults.py."""
import numpy as np
import pytest

from maskjax import faults
from maskjax.train import Policy, Rows, Todo


def policy(**overrides):
    values = dict(end=10, total_steps=10, log_every=3, checkpoint_every=4, eval_every=5, nonfinite_mode="stop",
                  max_skipped=0, count_bad_records=False)
    return Policy(**{**values, **overrides})


def test_cadence_logs_saves_and_evaluates_on_their_steps_and_always_at_the_end():
    p = policy()
    todo = {done: p.after(done) for done in range(1, 11)}
    assert [d for d, t in todo.items() if t.log] == [3, 6, 9, 10]
    assert [d for d, t in todo.items() if t.save] == [4, 8, 10]
    assert [d for d, t in todo.items() if t.evaluate] == [5]  # the end has its own evaluation
    assert [d for d, t in todo.items() if t.check] == [3, 4, 6, 8, 9, 10]
    interrupted = policy(end=7)  # stop_at: the last step run is logged and saved
    assert interrupted.after(7).log and interrupted.after(7).save
    assert not policy(eval_every=0).after(5).evaluate


def test_a_preemption_notice_saves_and_stops_at_any_step():
    todo = policy().after(5, preempted=True)
    assert todo == Todo(log=False, save=True, evaluate=True, preempted=True) and todo.check


def rows(checked, bad_at=(), skipped=None):
    """Metrics of steps checked+1 .. checked+4, non-finite at ``bad_at``."""
    out = []
    for s in range(checked + 1, checked + 5):
        bad = s in bad_at
        out.append((s, {"loss": float("nan") if bad else 1.0, "grad_norm": 2.0, "param_norm": 3.0,
                        "nonfinite": int(bad), "skipped_steps": skipped if skipped is not None else len(bad_at)}))
    return Rows(checked=checked, last=checked + 4, metrics=out)


def test_stop_saves_the_state_before_the_first_bad_step_and_stops():
    verdict = policy().nonfinite(rows(4, bad_at=(7, 8)), saved=4, directory="W/checkpoints")
    assert verdict.save == 6 and verdict.rewind and not verdict.messages
    assert "non-finite loss or gradient at step 7 (loss nan, grad_norm 2" in verdict.error
    assert "the last good state is checkpoint step 6 in W/checkpoints" in verdict.error
    assert policy().nonfinite(rows(4, bad_at=(7,)), saved=6, directory="W").save is None  # already saved
    first = policy().nonfinite(rows(0, bad_at=(1,)), saved=None, directory="W")
    assert first.save is None and "no update was applied" in first.error
    assert policy().nonfinite(rows(4), saved=4, directory="W") == type(first)()  # nothing to do


def test_skip_reports_each_bad_step_and_stops_past_the_limit():
    p = policy(nonfinite_mode="skip", max_skipped=2)
    verdict = p.nonfinite(rows(4, bad_at=(6,)), saved=4, directory="W")
    assert verdict.messages == ("step 6: non-finite loss or gradient; update skipped (1 skipped so far)",)
    assert verdict.error is None and verdict.save is None
    over = p.nonfinite(rows(4, bad_at=(5, 6, 8)), saved=4, directory="W")
    assert len(over.messages) == 3 and over.save == 8 and not over.rewind
    assert "3 steps had non-finite values, more than faults.max_skipped_steps=2" in over.error
    assert policy(nonfinite_mode="skip").nonfinite(rows(4, bad_at=(5, 6, 8)), 4, "W").error is None  # no limit


class ListLoader:
    def __init__(self, n):
        self.items = iter([{"x": np.full(2, float(i), np.float32), "id": np.full(2, i, np.int32)} for i in range(n)])
        self.state = "mine"

    def __next__(self):
        return next(self.items)

    def get_state(self):
        return self.state


def test_fault_injection_wraps_the_loader_and_the_step_only_when_asked(monkeypatch):
    loader, step = ListLoader(3), lambda state, batch: (state + 1, batch)
    monkeypatch.delenv("MASKJAX_FAULTS", raising=False)
    assert faults.inject(loader, step, 0) == (loader, step)  # no faults: the loop runs the originals
    monkeypatch.setenv("MASKJAX_FAULTS", "nan@batch:6")
    batches, wrapped = faults.inject(loader, step, 4)  # resumed after step 4: the next batch is step 5's
    first, second = next(batches), next(batches)
    assert np.isfinite(first["x"]).all() and np.isnan(second["x"]).all()
    np.testing.assert_array_equal(second["id"], [1, 1])  # integer arrays cannot be poisoned
    assert batches.get_state() == "mine" and wrapped(1, second) == (2, second)
    monkeypatch.setenv("MASKJAX_FAULTS", "nan@nowhere:1")
    with pytest.raises(faults.FaultSpecError, match="nan@nowhere:1"):
        faults.check_spec()

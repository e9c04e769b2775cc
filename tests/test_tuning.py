"""The tuning framework: coarse grid, refinement, dedupe, and a best-by-calibration choice."""
import pytest

from soda import tuning
from soda.errors import UserError


class FakeSchedule:
    def __init__(self, **params):
        self.params = params
        self.steps = [sorted(params.items())]
        self.selector = "none"


def test_refine_midpoints_and_flips():
    space = tuning.Space({"N": (2, 4, 7, 12), "w": (0.0, 2.0), "end": (True, False)})
    tried = space.points()
    out = space.refine({"N": 4, "w": 2.0, "end": True}, tried)
    assert out == [{"N": 3, "w": 2.0, "end": True}, {"N": 6, "w": 2.0, "end": True}, {"N": 4, "w": 1.0, "end": True}]
    assert len(space.refine({"N": 7, "w": 0.0, "end": False}, tried)) <= tuning.REFINE


def test_tune_picks_the_best_calibration_score(monkeypatch):
    """Score peaks at N = 6, off the coarse grid: the rule's N = 5 wins the coarse stage and the
    refinement around it (midpoints to its neighbours 4 and 8) finds 6. N = 2 cannot reach the window."""
    monkeypatch.setitem(tuning.SPACES, "newbase", tuning.Space({"N": (2, 4, 8)}))  # one line declares a baseline

    def build(N=5):  # the rule setting ({}) is N = 5
        if N == 2:
            raise UserError("cannot reach")
        return FakeSchedule(N=N)

    scored = []

    def evaluate(s):
        scored.append(s.params["N"])
        return -abs(s.params["N"] - 6)

    t = tuning.tune("newbase", build, evaluate, 2.5)
    assert t.params == {"N": 6} and t.calibration_psnr == 0
    assert scored == [5, 4, 8, 6] and t.tried == 5 and t.evaluated == 4  # N=2 tried, not evaluated
    assert t.summary()["evaluated"] == 4


def test_every_baseline_has_equal_coarse_effort():
    sizes = {p: len(s.points()) for p, s in tuning.SPACES.items()}
    assert set(sizes.values()) == {16}, sizes
    with pytest.raises(UserError, match="no tuning space"):
        tuning.tune("soda", lambda: None, lambda s: 0.0, 2.0)

"""scripts/eval_distill.py's statistics over several sets of seeds: the sets it scores and the
paired gap to the reference with its standard error."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import eval_distill  # noqa: E402


class FirstValueJudge:
    """Scores a set by its first sample's value and its size, so the split can be read back."""

    def score(self, x):
        return {"pca_fd": float(x[0]), "confident": float(len(x))}


def test_sets_are_consecutive_seeds_of_the_asked_size_and_a_short_tail_is_left_out():
    x = np.arange(11.0)
    scores = eval_distill.set_scores(FirstValueJudge(), x, 4)
    assert [s["pca_fd"] for s in scores] == [0.0, 4.0]  # seeds 0..3 and 4..7; 8..10 are not a set of 4
    assert [s["confident"] for s in scores] == [4.0, 4.0]
    assert len(eval_distill.set_scores(FirstValueJudge(), np.arange(8.0), 4)) == 2


def test_the_paired_gap_is_the_mean_of_set_by_set_differences_with_its_standard_error():
    reference = [15.1, 20.0, 14.5, 20.0]
    student = [17.3, 18.0, 13.7, 19.7]
    gap, se = eval_distill.paired_gap(student, reference)
    differences = [2.2, -2.0, -0.8, -0.3]
    assert gap == pytest.approx(-0.225)
    # sample standard deviation (n - 1) over sqrt(n): sd of the four differences is 1.76706
    sd = (sum((d - gap) ** 2 for d in differences) / 3) ** 0.5
    assert se == pytest.approx(sd / 2) and se == pytest.approx(0.88353, abs=1e-5)
    # a shift shared by every set (the seeds' luck) does not change the gap or its error
    assert eval_distill.paired_gap([s + 5 for s in student], [r + 5 for r in reference]) == pytest.approx((gap, se))


def test_bad_set_counts_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        eval_distill.main(["runs/none", "--sets", "0"])
    assert stop.value.code == 2
    assert "--sets at least 1" in capsys.readouterr().err

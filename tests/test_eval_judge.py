"""The digits judge of scripts/eval_digits.py gives the same verdicts whatever BLAS threads its
caller runs with: fitted on 2 threads its classifier judged 2 of 500 samples differently."""

import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import eval_digits  # noqa: E402


def test_the_judges_classifier_does_not_depend_on_the_callers_blas_threads():
    with threadpool_limits(1):
        one = eval_digits.DigitJudge().classifier
    with threadpool_limits(2):  # where the machine has 2 cores, lbfgs stopped elsewhere (0.01 apart)
        two = eval_digits.DigitJudge().classifier
    assert np.array_equal(one.coef_, two.coef_) and np.array_equal(one.intercept_, two.intercept_)

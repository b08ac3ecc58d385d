"""Paired statistics (experiments/stats.py) on synthetic cases whose answers are known in closed form."""

import math

import numpy as np
import pytest

from experiments.stats import compare, mean_se, paired_bootstrap, seed_differences, verdict


def synthetic(seeds=5, n=400, p=0.6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((seeds, n)) < p).astype(int)


def test_identical_predictions_give_zero_with_zero_width():
    """A method compared with itself: difference 0, interval [0, 0], verdict 'no difference'."""
    a = {"t1": synthetic(), "t2": synthetic(seed=1)}
    boot = paired_bootstrap(a, a, n_boot=500)
    assert boot["diff"] == boot["low"] == boot["high"] == 0.0
    assert compare(a, a, n_boot=500)["verdict"] == "no difference"


def test_known_shift_is_recovered():
    """B = A with 10% of A's correct answers (the same examples for every seed) turned wrong: the observed
    difference equals the flipped share exactly, and the 95% interval covers it and excludes 0."""
    a = synthetic(n=1000)
    b = a.copy()
    flip = np.flatnonzero(a[0])[:100]
    b[:, flip] = 0
    expected = (a.sum() - b.sum()) / a.size
    boot = paired_bootstrap({"t": a}, {"t": b}, n_boot=2000)
    assert boot["diff"] == pytest.approx(expected) and boot["low"] < expected < boot["high"] and boot["low"] > 0
    assert compare({"t": a}, {"t": b}, n_boot=2000)["verdict"] == "reproduced"
    assert compare({"t": a}, {"t": b}, expect_positive=False, n_boot=2000)["verdict"] == "contradicted"


def test_interval_width_matches_binomial_theory():
    """Two independent methods at 60% on N examples, 1 seed: the bootstrap SE of the paired difference is close to
    the analytic sqrt(Var(D)/N) with D = a − b per example (within 10%)."""
    a, b = synthetic(seeds=1, n=2000, seed=3), synthetic(seeds=1, n=2000, seed=4)
    boot = paired_bootstrap({"t": a}, {"t": b}, n_boot=4000)
    analytic = (a - b).std() / np.sqrt(a.size)
    assert boot["se"] == pytest.approx(analytic, rel=0.1)


def test_suite_average_and_seed_level_differences():
    """The suite average is the unweighted mean over tasks (a small task weighs as much as a large one); the
    seed-level differences are one per seed and average to the same value."""
    a = {"small": np.ones((2, 10)), "large": np.zeros((2, 1000))}
    b = {"small": np.zeros((2, 10)), "large": np.zeros((2, 1000))}
    assert paired_bootstrap(a, b, n_boot=200)["diff"] == 0.5
    assert seed_differences(a, b) == [0.5, 0.5]
    c = compare(a, b, n_boot=200)
    assert c["seed_mean"] == pytest.approx(50.0) and c["seed_se"] == 0.0 and c["per_task"]["small"]["diff"] == 100


def test_seed_noise_widens_the_interval():
    """Two seeds that disagree in sign (+20 and −20 points) give an interval that contains 0 although each seed's
    test-set interval alone would not."""
    a = np.array([np.r_[np.ones(60), np.zeros(40)], np.r_[np.ones(40), np.zeros(60)]])
    b = np.array([np.r_[np.ones(40), np.zeros(60)], np.r_[np.ones(60), np.zeros(40)]])
    boot = paired_bootstrap({"t": a}, {"t": b}, n_boot=2000)
    assert boot["diff"] == 0 and boot["low"] < -0.05 and boot["high"] > 0.05


def test_verdicts_and_errors():
    """Verdict words by the interval's position; unpaired inputs are refused."""
    assert verdict(0.01, 0.02) == "reproduced" and verdict(-0.02, -0.01) == "contradicted"
    assert verdict(-0.01, 0.03) == "same direction, not resolved"
    assert verdict(-0.03, 0.01) == "opposite, not resolved"
    assert verdict(-0.03, 0.01, expect_positive=False) == "same direction, not resolved"
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)
    m, se = mean_se([5.0])  # one value: its SE is unknown, not 0
    assert m == 5.0 and math.isnan(se)
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap({"t": np.ones((1, 3))}, {"u": np.ones((1, 3))})
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap({"t": np.ones((2, 3))}, {"t": np.ones((1, 3))})


def test_t_interval_and_the_borderline_rule():
    """The seed-level t interval is mean ± t_{.975, S−1}·SE; a comparison is resolved only when the bootstrap and
    the t interval both exclude 0, "borderline" when exactly one does."""
    from experiments.stats import combined_verdict, t_interval
    m, lo, hi = t_interval([1.0, 2.0, 3.0])  # SE 1/√3 · 1 = 0.577, t(2) = 4.303
    assert m == 2.0 and lo == pytest.approx(2 - 4.303 / math.sqrt(3)) and hi == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert t_interval([1.0])[1:] == (None, None)
    assert combined_verdict("reproduced", "reproduced") == "reproduced"
    assert combined_verdict("contradicted", "opposite, not resolved") == "borderline"
    assert combined_verdict("same direction, not resolved", "reproduced") == "borderline"
    assert combined_verdict("opposite, not resolved", "opposite, not resolved") == "opposite, not resolved"
    assert combined_verdict("reproduced", None) == "reproduced"
    # every seed 20 points better on 1000 examples, but one seed 60 points worse: the bootstrap over (seed,
    # example) and the t interval over 5 seeds need not agree; whatever they say, the combined verdict follows them
    a = np.zeros((5, 1000))
    b = np.zeros((5, 1000))
    a[:4, :200] = 1
    b[4, :600] = 1
    c = compare({"t": a}, {"t": b}, n_boot=2000)
    assert c["t_low"] < c["seed_mean"] < c["t_high"]
    resolved = [v in ("reproduced", "contradicted") for v in (c["verdict_boot"], c["verdict_t"])]
    assert c["verdict"] == ("borderline" if sum(resolved) == 1 else c["verdict_boot"])
    assert set(c["per_task"]["t"]) >= {"diff", "low", "high", "t_low", "t_high", "verdict"}


def test_tilt_and_auroc_see_the_threshold_and_not_the_ranking():
    """A pure shift of every margin changes the predicted labels (tilt, accuracy) but not the AUROC; identical
    histograms have tilt 0; a perfect ranking has AUROC 1, a reversed one 0, ties ½."""
    from experiments.stats import auroc, compare_threshold_free, tilt
    assert tilt({"a": 50, "b": 50}, {"a": 50, "b": 50}) == 0.0
    assert tilt({"a": 90, "b": 10}, {"a": 50, "b": 50}) == pytest.approx(0.4)
    assert tilt({"a": 100}, {"a": 30, "b": 70}) == pytest.approx(0.7)
    pos = np.array([1, 1, 0, 0], bool)
    assert auroc([3, 2, 1, 0], pos) == 1.0 and auroc([0, 1, 2, 3], pos) == 0.0 and auroc([1, 1, 1, 1], pos) == 0.5
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.5
    margin = rng.normal(size=(3, 400)) + positive  # 3 seeds, informative margins
    shifted = margin + 1.5                         # the same ranking, every answer tilted to option 1
    acc = lambda m: ((m > 0) == positive).astype(int)  # noqa: E731
    assert auroc(shifted[0], positive) == auroc(margin[0], positive)
    assert compare({"t": acc(margin)}, {"t": acc(shifted)}, n_boot=500)["verdict_boot"] != "no difference"
    tf = compare_threshold_free({"t": {"margin": margin, "positive": positive}},
                                {"t": {"margin": shifted, "positive": positive}}, n_boot=500)
    assert tf["diff"] == 0.0 and tf["low"] == 0.0 == tf["high"] and tf["verdict"] == "no difference"
    # a better ranking is seen: B's margins are noisier
    worse = margin + rng.normal(scale=3.0, size=margin.shape)
    tf = compare_threshold_free({"t": {"margin": margin, "positive": positive}},
                                {"t": {"margin": worse, "positive": positive}}, n_boot=500)
    assert tf["low"] > 0 and tf["verdict"] == "reproduced"
    # an accuracy task alongside: the suite score averages the two tasks' differences
    c = {"correct": np.ones((3, 50))}
    tf2 = compare_threshold_free({"t": {"margin": margin, "positive": positive}, "u": c},
                                 {"t": {"margin": worse, "positive": positive}, "u": c}, n_boot=200)
    assert tf2["diff"] == pytest.approx(tf["diff"] / 2)

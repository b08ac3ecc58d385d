"""Paired statistics: is method A better than method B, beyond the noise of seeds and of the test set?

Two methods are compared on the same seeds (each seed fixes init, dropout and data order for both) and on the same
test examples, so their difference is measured pair by pair:

  seed-level   d_s = avg_A(s) − avg_B(s) for each seed s; mean over seeds ± its standard error sd(d)/√n. It sees the
               seed noise only (the test set is the same for every run).
  bootstrap    the paired bootstrap over (seed, example): each replicate draws seeds with replacement (the same draw for
               A and B and for every task) and, for each task, test examples with replacement (the same draw for A and
               B), then recomputes the suite-average difference; the 2.5% and 97.5% quantiles of the replicates are
               the 95% interval. It sees both noises, so it is the interval a claim is judged by.

The suite average is the unweighted mean over tasks of each task's accuracy (averaged over seeds), as the paper
reports it. Accuracies are fractions in [0, 1] here; multiply by 100 for points.

Verdict for a claimed sign (the paper says A > B): "reproduced" (our interval is above 0), "contradicted" (below
0), "same direction, not resolved" / "opposite, not resolved" (the interval contains 0), "no difference" (A and B
made the same predictions).
"""

import math

import numpy as np

VERDICTS = ("reproduced", "same direction, not resolved", "opposite, not resolved", "contradicted", "no difference")


def mean_se(values):
    """(mean, standard error of the mean) of a list of numbers; the SE of a single value is unknown: NaN (printed
    as "n/a", never as a reassuring 0)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_se needs at least one value")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


def binomial_se(p, n):
    """Standard error of an accuracy p measured on n independent examples: sqrt(p(1−p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def _as_matrices(correct_a, correct_b):
    """{task: [seeds, examples]} float arrays for A and B, checked to be paired (same tasks, seeds, examples)."""
    if set(correct_a) != set(correct_b) or not correct_a:
        raise ValueError(f"paired statistics need the same tasks for both methods, got {sorted(correct_a)} and "
                         f"{sorted(correct_b)}")
    out, seeds = {}, None
    for t in sorted(correct_a):
        a, b = np.asarray(correct_a[t], dtype=float), np.asarray(correct_b[t], dtype=float)
        if a.ndim != 2 or a.shape != b.shape or a.shape[1] == 0:
            raise ValueError(f"task {t}: correctness must be [seeds, examples] of the same shape for both methods, "
                             f"got {a.shape} and {b.shape}")
        if seeds is not None and a.shape[0] != seeds:
            raise ValueError(f"task {t} has {a.shape[0]} seeds, other tasks {seeds}")
        seeds = a.shape[0]
        out[t] = (a, b)
    return out


def seed_differences(correct_a, correct_b):
    """Per seed, the suite-average accuracy of A minus that of B: a list with one difference per seed."""
    m = _as_matrices(correct_a, correct_b)
    per_task = np.stack([a.mean(1) - b.mean(1) for a, b in m.values()])  # [tasks, seeds]
    return per_task.mean(0).tolist()


def paired_bootstrap(correct_a, correct_b, n_boot=10_000, seed=0, level=0.95, chunk=500):
    """The paired bootstrap over (seed, example) of the suite-average accuracy difference A − B.

    correct_a, correct_b: {task: [seeds, examples]} 0/1 correctness, rows in the same seed order, columns the same
    test examples. Returns {"diff": the observed difference, "low", "high": the percentile interval at `level`,
    "se": the replicates' standard deviation, "per_task": {task: {"diff", "low", "high"}}, "n_boot", "seeds"}.
    A replicate's statistic is Σ_s Σ_e c_s · k_e · D[s, e] / (S · N) with c ~ Multinomial(S) the seed counts and
    k ~ Multinomial(N) the example counts of that task, D = correct_A − correct_B: the mean over a resample.
    """
    m = _as_matrices(correct_a, correct_b)
    S = next(iter(m.values()))[0].shape[0]
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot).astype(float)  # [B, S]
    per_task, replicates = {}, []
    for t, (a, b) in m.items():
        D = a - b
        N = D.shape[1]
        reps = np.empty(n_boot)
        for i in range(0, n_boot, chunk):  # [chunk, N] at a time: a 10k x 2000 matrix would be 160 MB
            k = rng.multinomial(N, np.full(N, 1.0 / N), size=min(chunk, n_boot - i)).astype(float)
            reps[i:i + len(k)] = ((seed_counts[i:i + len(k)] @ D) * k).sum(1) / (S * N)
        replicates.append(reps)
        per_task[t] = {"diff": float(D.mean()), **_interval(reps, level)}
    reps = np.mean(replicates, axis=0)
    observed = float(np.mean([d["diff"] for d in per_task.values()]))
    return {"diff": observed, **_interval(reps, level), "se": float(reps.std(ddof=1)), "per_task": per_task,
            "n_boot": n_boot, "seeds": S, "level": level}


def _interval(reps, level):
    lo, hi = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"low": float(lo), "high": float(hi)}


def verdict(low, high, expect_positive=True, identical=False):
    """The claim "A − B has the expected sign" judged by the interval [low, high] of A − B (see the module doc)."""
    if identical:
        return "no difference"
    if low > 0 or high < 0:
        return "reproduced" if (low > 0) == expect_positive else "contradicted"
    mid = (low + high) / 2
    return "same direction, not resolved" if (mid > 0) == expect_positive else "opposite, not resolved"


def compare(correct_a, correct_b, expect_positive=True, n_boot=10_000, seed=0):
    """Everything a claim row needs: the seed-level paired difference (mean ± SE), the bootstrap interval, the
    verdict. Differences in accuracy points (×100)."""
    diffs = seed_differences(correct_a, correct_b)
    boot = paired_bootstrap(correct_a, correct_b, n_boot=n_boot, seed=seed)
    mean, se = mean_se(diffs)
    identical = all(np.array_equal(np.asarray(correct_a[t]), np.asarray(correct_b[t])) for t in correct_a)
    return {"diff": 100 * boot["diff"], "seed_mean": 100 * mean, "seed_se": 100 * se, "seed_diffs":
            [100 * d for d in diffs], "low": 100 * boot["low"], "high": 100 * boot["high"],
            "per_task": {t: {k: 100 * v for k, v in d.items()} for t, d in boot["per_task"].items()},
            "seeds": boot["seeds"], "verdict": verdict(boot["low"], boot["high"], expect_positive, identical)}


def describe(c):
    """'+1.23 [−0.40, +2.90] (5 seeds; seed-level +1.20 ± 0.55)' for a `compare` result."""
    return (f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] ({c['seeds']} seed{'s' * (c['seeds'] > 1)}; "
            f"seed-level {c['seed_mean']:+.2f} ± {se_text(c['seed_se'])})")


def se_text(se, digits=2):
    """A standard error for print: "n/a" where it is unknown (one seed)."""
    return "n/a" if math.isnan(se) else f"{se:.{digits}f}"

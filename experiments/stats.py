"""Paired statistics: is method A better than method B, beyond the noise of seeds and of the test set?

Both methods share seeds and test examples, so differences are paired: the paired bootstrap over (seed, example)
sees both noises, the t interval over per-seed differences the seed noise only. A comparison is resolved only when
both intervals exclude 0 on one side (`combined_verdict`). A small model's accuracy can move by tilting a threshold:
`tilt` flags it, and AUROC of a two-option task's margin (`compare_threshold_free`) is blind to it.
"""
import math

import numpy as np

VERDICTS = ("reproduced", "same direction, not resolved", "opposite, not resolved", "contradicted", "no difference",
            "borderline")
TILT_FLAG = 0.10  # a task whose predicted-label shares are this far from the gold shares is flagged "tilted"
# Student's t 97.5% quantiles; between rows the next smaller df (conservative), from df 100 the normal's 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def mean_se(values):
    """(mean, standard error of the mean); the SE of a single value is NaN, never a reassuring 0."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_se needs at least one value")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


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
    return np.stack([a.mean(1) - b.mean(1) for a, b in _as_matrices(correct_a, correct_b).values()]).mean(0).tolist()


def paired_bootstrap(correct_a, correct_b, n_boot=10_000, seed=0, level=0.95, chunk=500):
    """The paired bootstrap over (seed, example) of the suite-average accuracy difference A − B, from {task:
    [seeds, examples]} 0/1 correctness: a replicate is Σ c_s k_e D[s, e] / (S N), c and k multinomial counts."""
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


def t_interval(diffs):
    """(mean, low, high): the 95% paired t interval over seeds of per-seed differences (None, None with one seed)."""
    m, se = mean_se(diffs)
    if len(diffs) < 2:
        return m, None, None
    df = len(diffs) - 1
    t = T975[max(k for k in T975 if k <= df)] if df < 100 else 1.96
    return m, m - t * se, m + t * se


def combined_verdict(boot, t):
    """Resolved only when both intervals are, "borderline" when one is; else (or without t) the bootstrap's."""
    if t is None or boot == t or boot == "no difference":
        return boot
    return "borderline" if {boot, t} & {"reproduced", "contradicted"} else boot


def compare(correct_a, correct_b, expect_positive=True, n_boot=10_000, seed=0):
    """In points: the bootstrap and t intervals of the suite-average difference with their verdicts, also per task."""
    m = _as_matrices(correct_a, correct_b)
    task_diffs = {t: a.mean(1) - b.mean(1) for t, (a, b) in m.items()}  # [seeds] per task
    diffs = np.mean(list(task_diffs.values()), axis=0).tolist()          # seed_differences
    boot = paired_bootstrap(correct_a, correct_b, n_boot=n_boot, seed=seed)
    mean, se = mean_se(diffs)
    same = {t: np.array_equal(a, b) for t, (a, b) in m.items()}
    out = {"diff": 100 * boot["diff"], "seed_mean": 100 * mean, "seed_se": 100 * se, "seed_diffs":
           [100 * d for d in diffs], "low": 100 * boot["low"], "high": 100 * boot["high"],
           "per_task": {}, "seeds": boot["seeds"]}
    out.update(verdicts(boot["low"], boot["high"], diffs, expect_positive, all(same.values()), scale=100))
    for t, d in boot["per_task"].items():
        out["per_task"][t] = {**{k: 100 * v for k, v in d.items()}, **verdicts(
            d["low"], d["high"], task_diffs[t].tolist(), expect_positive, same[t], scale=100)}
    return out


def verdicts(low, high, diffs, expect_positive, identical, scale=1.0):
    """The bootstrap's verdict, the t interval over `diffs` (in `scale` units) and its verdict, and the combined."""
    _, tl, th = t_interval(diffs)
    vb = verdict(low, high, expect_positive, identical)
    vt = None if tl is None else verdict(tl, th, expect_positive, identical)
    return {"t_low": None if tl is None else scale * tl, "t_high": None if th is None else scale * th,
            "verdict_boot": vb, "verdict_t": vt, "verdict": combined_verdict(vb, vt)}


def describe(c):
    """'+1.23 [−0.40, +2.90], t [−0.60, +3.10] (5 seeds)' for a `compare` result."""
    t = "" if c.get("t_low") is None else f", t [{c['t_low']:+.2f}, {c['t_high']:+.2f}]"
    return f"{c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]{t} ({c['seeds']} seed{'s' * (c['seeds'] > 1)})"


# ------------------------------------------------------------------------------- threshold diagnostics

def tilt(predicted, gold):
    """The largest |predicted share − gold share| over a task's labels, from two {label: count} histograms."""
    n_pred, n_gold = sum(predicted.values()), sum(gold.values())
    labels = set(predicted) | set(gold)
    return max(abs(predicted.get(k, 0) / n_pred - gold.get(k, 0) / n_gold) for k in labels)


def auroc(margin, positive):
    """P(margin_i > margin_j) for a random positive i and negative j, ties ½ (Mann-Whitney); NaN without both."""
    margin, positive = np.asarray(margin, dtype=float), np.asarray(positive, dtype=bool)
    pos, neg = margin[positive], margin[~positive]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    return float(_pairwise(pos, neg).mean())


def _pairwise(pos, neg):
    """[n₊, n₋] matrix of 1[pos_i > neg_j] + ½·1[pos_i = neg_j]."""
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def compare_threshold_free(tasks_a, tasks_b, expect_positive=True, n_boot=2000, seed=0):
    """`compare` with two-option tasks scored by AUROC ({"margin", "positive"}), others by accuracy ({"correct"});
    a replicate's AUROC weights each pair (i, j) by its examples' counts k_i·k_j."""
    if set(tasks_a) != set(tasks_b) or not tasks_a:
        raise ValueError("threshold-free comparison needs the same tasks for both methods")
    rng = np.random.default_rng(seed)
    first = next(iter(tasks_a.values()))
    S = np.asarray(first.get("correct", first.get("margin"))).shape[0]
    seed_counts = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot).astype(float)  # [B, S]
    per_seed, reps, identical = [], [], True  # identical: the same correctness and the same ranking everywhere
    for t in sorted(tasks_a):
        a, b = tasks_a[t], tasks_b[t]
        if "correct" in a:
            D = np.asarray(a["correct"], dtype=float) - np.asarray(b["correct"], dtype=float)  # [S, N]
            k = rng.multinomial(D.shape[1], np.full(D.shape[1], 1.0 / D.shape[1]), size=n_boot).astype(float)
            per_seed.append(D.mean(1))
            identical &= not D.any()
            reps.append(((seed_counts @ D) * k).sum(1) / (S * D.shape[1]))
            continue
        pos = np.asarray(a["positive"], dtype=bool)
        ma, mb = np.asarray(a["margin"], dtype=float), np.asarray(b["margin"], dtype=float)
        H = np.stack([_pairwise(x[pos], x[~pos]) - _pairwise(y[pos], y[~pos]) for x, y in zip(ma, mb)])  # [S,+,-]
        N = pos.size
        k = rng.multinomial(N, np.full(N, 1.0 / N), size=n_boot).astype(float)
        kp, kn = k[:, pos], k[:, ~pos]
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without both classes: NaN, dropped below
            per_rep_seed = np.stack([((kp @ h) * kn).sum(1) for h in H], 1) / (kp.sum(1) * kn.sum(1))[:, None]
        per_seed.append(H.mean((1, 2)))
        identical &= not H.any()
        reps.append((seed_counts * per_rep_seed).sum(1) / S)
    diffs = np.mean(per_seed, axis=0)  # [S]: suite-score difference per seed
    reps = np.mean(reps, axis=0)
    reps = reps[np.isfinite(reps)]  # only tiny test sets draw a resample with one class
    lo, hi = _interval(reps, 0.95).values()
    out = {"diff": 100 * float(diffs.mean()), "low": 100 * lo, "high": 100 * hi, "seeds": S,
           "seed_diffs": (100 * diffs).tolist()}
    out.update(verdicts(lo, hi, diffs.tolist(), expect_positive, identical, scale=100))
    return out

"""Smoke tests of tutorials/: each runs end to end in `--tiny` mode in a subprocess, writing to a temp dir (`--out`),
and its results JSON is checked against what the tutorial demonstrates. 01, 02 and 07 build a 2-layer random Llama
and check exact facts (zero-init, merges equal to fp32 round-off, METHODS §1 parameter counts, which adapters can
merge, identical heads for HydraLoRA without router). The claim readers (03-06, 08, 09, report.py) train a tiny
claim grid (experiments/claims.py on the tiny model: 2 builtin tasks, 3 steps, 2 seeds) in a temp dir and render
it; their JSON is checked for the paired statistics (intervals around their estimates, verdict words, seeds) and
for the mechanisms the grid's analyses measure (identical heads without router, zero-init heads more alike than
random ones, ΔW rank limits, matched budgets). Each claim reader (03, 05, 06, 08, 09, 10) first runs its mechanism
cell, a toy of seconds whose numbers land under "mechanism": they are checked (by hand against the library, or the
direction the toy shows), and every test the cell names as pinning the same fact must exist. The committed results in
tutorials/results are not touched.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.stats import VERDICTS as STATS_VERDICTS

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
MERGEABLE = {"lora": True, "align": True, "hydra": False, "hydra-norouter": True, "rlora": False, "mlora": True,
             "mtl": False, "multilora": True}  # METHODS §2 "Mergeable" lines and §7 claim 7
# experiments/stats.py's verdicts, claims 3 and 10's equivalence verdicts (experiments/claims.py equivalence_verdict),
# and the per-run analyses' one-seed case (experiments/reports.py seed_paired)
VERDICTS = {*STATS_VERDICTS, "equivalent within ±1 point", "not worse (interval above −1)", "not resolved", "worse",
            "below (interval under 0)", "one seed: no interval"}


def run_tutorial(script, out, *flags):
    """Run tutorials/<script> --tiny --out <out> in a fresh interpreter; return its results JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors gain nothing from threads on a shared machine
    res = subprocess.run([sys.executable, str(TUTORIALS / script), "--tiny", "--out", str(out), *flags],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    stem = script.removesuffix(".py")
    if HAVE_MPL:
        assert (out / f"{stem}.png").stat().st_size > 1000
    return json.loads((out / f"{stem}.json").read_text())


def test_01_lora_from_scratch(tmp_path):
    """The by-hand equation equals LoRALinear; B = 0 leaves layer and model exactly unchanged; first-step ‖ΔW‖ shrinks
    like 1/√r under α/r and stays flat under α/√r; counts equal r·Σ(d_in + d_out); merges match to round-off."""
    r = run_tutorial("01_lora_from_scratch.py", tmp_path)
    assert r["equation_max_abs_diff"] < 1e-5
    assert r["init"]["max_abs_diff_vs_base"] == 0.0 and r["init"]["B_is_zero"]
    assert r["init"]["A_max_abs"] <= r["init"]["A_bound"]
    ranks = [row["rank"] for row in r["scaling_sweep"]["rows"]["alpha/r"]]
    growth = r["scaling_sweep"]["first_step_dW_growth_lowest_to_highest_rank"]
    expected = (ranks[0] / ranks[-1]) ** 0.5  # 1/√(rank ratio)
    assert 0.7 * expected < growth["alpha/r"] < 1.3 * expected
    assert 0.8 < growth["alpha/sqrt(r)"] < 1.25
    layer = r["one_layer"]
    assert layer["trainable"] == layer["formula"]
    assert layer["merge_max_abs_diff"] < 1e-4 * max(1.0, layer["delta_max_abs"])
    m = r["model_lora"]
    assert m["init_max_abs_logit_diff"] == 0.0 and m["trainable"] == m["formula"] and m["trainable_non_lora"] == 0
    mm = r["model_merge"]
    assert mm["random_B_logit_shift"] > 1e-2  # the merge check below compares something non-trivial
    assert mm["merge_max_abs_logit_diff"] < 1e-4 * max(1.0, mm["random_B_logit_shift"])
    assert mm["adapters_left"] == 0 and mm["params_after_merge"] == m["base_params"]
    assert mm["peft_key_example"].startswith("base_model.model.model.layers.")


def test_02_multi_head_family(tmp_path):
    """Which adapters merge (one layer and whole model agree with METHODS §2); which start exactly at the base
    (all but R-LoRA, whose compensation assumes a uniform router); the Qwen2.5-3B counts of METHODS §1; HydraLoRA
    without router keeps bit-identical heads (cosine 1) while R-LoRA/M-LoRA heads start unrelated (cosine ≈ 0)."""
    r = run_tutorial("02_multi_head_family.py", tmp_path)
    kinds = ["lora", "hydra", "hydra-norouter", "rlora", "mlora", "mtl", "multilora"]
    for k in kinds:
        assert r["one_layer"][k]["mergeable"] is MERGEABLE[k], k
        assert r["real_model"]["adapters"][k]["mergeable"] is MERGEABLE[k], k
        layer_diff = r["one_layer"][k]["init_max_abs_diff"]
        model_diff = r["real_model"]["adapters"][k]["init_max_abs_logit_diff"]
        if k in ("lora", "hydra", "hydra-norouter", "mtl", "multilora"):
            assert layer_diff == 0.0 and model_diff == 0.0, k   # zero heads / zero scales
        elif k == "mlora":
            assert layer_diff < 1e-5 and model_diff < 1e-4       # exact compensation, up to round-off
        else:
            assert layer_diff > 1e-3 and model_diff > 1e-3       # R-LoRA: compensation exact only for ω = 1/N
        merge = r["real_model"]["adapters"][k]["merge_max_abs_logit_diff"]
        assert (merge is not None and merge < 1e-3) if MERGEABLE[k] else merge is None
    assert r["one_layer"]["multilora"]["a_output_shape"][-1] == 3 * r["rank"]  # the n A-outputs side by side
    assert r["methods_qwen3b_match"] == {"mlora": True, "hydra": True, "rlora": True}
    assert r["param_counts"]["qwen2.5-3b"]["mlora"]["trainable"] == 12_570_624
    nr = r["real_model"]["adapters"]["hydra-norouter"]
    assert nr["head_cos_mean_per_step"][0] is None                     # zero heads: no direction yet
    assert all(c > 1 - 1e-5 for c in nr["head_cos_mean_per_step"][1:]) and nr["max_abs_head_difference"] == 0.0
    for k in ("rlora", "mlora"):
        assert abs(r["real_model"]["adapters"][k]["head_cos_mean_per_step"][0]) < 0.3, k  # independent random heads


def check_cost(r, kinds):
    assert list(r["adapters"]) == kinds
    for k in kinds:
        a = r["adapters"][k]
        assert a["trainable"] > 0 and a["step_s"] > 0 and a["infer_s"]["base"] > 0
        assert a["mergeable"] is MERGEABLE[k], k
        if MERGEABLE[k]:
            assert a["merge_max_abs_logit_diff"] < 1e-3 and "merged" in a["overhead_wall"]
        else:
            assert "cannot be merged" in a["merge_refusal"] and "merged" not in a["overhead_wall"]


def test_07_cost_all_adapters(tmp_path):
    """Every adapter kind trains, is timed and merges or refuses as METHODS §7 claim 7 says; align and lora have the
    same trainable count (the alignment loss adds no parameters), multi-head ones more. (In-process for speed.)"""
    r = run_tutorial("07_cost.py", tmp_path, "--in-process")
    kinds = ["lora", "align", "hydra", "hydra-norouter", "rlora", "mlora", "mtl", "multilora"]
    check_cost(r, kinds)
    a = r["adapters"]
    assert a["align"]["trainable"] == a["lora"]["trainable"]
    assert all(a[k]["trainable"] > a["lora"]["trainable"] for k in kinds[2:])
    assert a["hydra"]["trainable"] == a["rlora"]["trainable"]  # same tensors, router included
    assert a["mlora"]["trainable"] == a["hydra-norouter"]["trainable"] < a["hydra"]["trainable"]  # no router
    assert set(r["summary"]) == set(kinds) and r["summary"]["lora"]["step_vs_lora"] == 1.0


def test_07_cost_subprocess_worker(tmp_path):
    """The default path: each adapter measured in its own subprocess (peak memory per adapter)."""
    r = run_tutorial("07_cost.py", tmp_path, "--kinds", "mlora")
    check_cost(r, ["mlora"])
    assert r["memory_per_adapter"] is True
    assert all(a["mem_mb_peak_train"] > 0 for a in r["adapters"].values())


def test_07_cost_rejects_unknown_kind(tmp_path):
    """A misspelt adapter kind is a one-line error naming the valid kinds, before any work is done."""
    res = subprocess.run([sys.executable, str(TUTORIALS / "07_cost.py"), "--tiny", "--out", str(tmp_path),
                          "--kinds", "lora,hydr"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode != 0 and "unknown adapter kind 'hydr'" in res.stderr and "hydra-norouter" in res.stderr
    assert not (tmp_path / "07_cost.json").exists()



def check_claim(r, claim, labels, pairs, seeds=(0, 1)):
    """A claim grid as a reader wrote it: every method with its seeds, a suite average inside [0, 100] whose mean is
    that of its per-seed values, a paired comparison with the base model, per-task cells for every task; the
    claimed pairs in claims.py's order with the interval around the estimate and a verdict."""
    c = r["claims"][claim]
    rep = c["report"]
    assert list(rep["methods"]) == labels and c["missing"] == [] and rep["base"] is not None
    for k, row in rep["methods"].items():
        assert row["seeds"] == list(seeds), k
        assert 0.0 <= row["average"] <= 100.0 and row["average"] == pytest.approx(sum(row["per_seed"]) / len(seeds))
        v = row["vs_base"]
        assert v["low"] <= v["diff"] <= v["high"] and v["verdict"] in VERDICTS
        assert set(c["per_task"][k]) == set(rep["suite"]["tasks"])
        assert all(0.0 <= t["mean"] <= 100.0 and 0 <= t["collapsed"] <= len(seeds) for t in c["per_task"][k].values())
    assert 0.0 < c["majority"]["average"] <= 100.0
    assert [(x["a"], x["b"]) for x in rep["comparisons"]] == pairs
    for x in rep["comparisons"]:
        assert x["low"] <= x["diff"] <= x["high"] and x["verdict"] in VERDICTS and x["seeds"] == len(seeds)
    return c


def check_paired(items, pairs):
    """Seed-paired differences of a per-run analysis: the claimed pairs, the interval around the mean, a verdict."""
    assert [(x["a"], x["b"]) for x in items] == pairs
    for x in items:
        assert x["low"] <= x["diff"] <= x["high"] and x["verdict"] in VERDICTS and len(x["per_seed"]) == x["seeds"]


def trainable(c):
    return {k: row["trainable"] for k, row in c["report"]["methods"].items()}


def mechanism(r):
    """The tutorial's mechanism cell (its toy, run first in every mode): its numbers, after checking that every test
    it names as pinning the same fact exists."""
    m = r["mechanism"]
    assert m["tests"]
    for t in m["tests"]:
        path, test = t.split("::")
        assert f"def {test}(" in (ROOT / path).read_text(), t
    return m


def test_03_head_similarity(tmp_path):
    """Claim 1's head analysis read from the tiny grid: per-layer cosines in [-1, 1] for both layers of every module
    type; HydraLoRA w/o Router's heads identical (cosine 1 to float round-off: claim 2's mechanism, exact); the
    zero-init symmetry: HydraLoRA's heads end far more alike than R-LoRA's/M-LoRA's independent random heads."""
    r = run_tutorial("03_head_similarity.py", tmp_path)
    check_claim(r, "1-2", ["hydra", "hydra-norouter", "rlora", "mlora"],
                [("mlora", "rlora"), ("mlora", "hydra"), ("hydra-norouter", "hydra")])
    for method, modules in r["per_layer"].items():
        for per_seed in modules.values():
            assert len(per_seed) == 2 and all(len(v) == 2 and all(abs(x) <= 1 + 1e-6 for x in v) for v in per_seed)
    assert r["norouter_identical_heads"]["values"] == 2 * 2 * 3  # seeds x layers x module types
    assert r["norouter_identical_heads"]["max_abs_one_minus_cos"] < 1e-5
    h = r["head_cosine"]
    assert h["hydra"]["all"][0] - 3 * h["hydra"]["all"][1] > max(h["rlora"]["all"][0], h["mlora"]["all"][0]) + 0.3
    check_paired(r["ordering"], [("mlora", "rlora"), ("mlora", "hydra")])
    # the mechanism cell: 5 AdamW steps on the toy; zero heads have no direction at step 0, then HydraLoRA's are
    # alike, HydraLoRA w/o Router's identical, R-LoRA's random heads near orthogonal at the grids' lr 1e-3
    curves = mechanism(r)["head_cosine_per_step"]
    assert all(len(v) == 6 for v in curves.values())
    assert curves["hydra lr=0.001"][0] is None and min(curves["hydra lr=0.001"][1:]) > 0.4
    assert curves["hydra-norouter lr=0.001"][0] is None
    assert all(abs(v - 1) < 1e-5 for v in curves["hydra-norouter lr=0.001"][1:])
    assert all(abs(v) < 0.2 for v in curves["rlora lr=0.001"])


def test_04_simplified_multi_head(tmp_path):
    """Claims 1-2 read from the tiny grid: four methods x 2 seeds, each against the base model, the three claimed
    pairs with the paper's differences (METHODS §6.2 Table 1); parameter counts as METHODS §1 says (no router =
    fewer)."""
    r = run_tutorial("04_simplified_multi_head.py", tmp_path)
    c = check_claim(r, "1-2", ["hydra", "hydra-norouter", "rlora", "mlora"],
                    [("mlora", "rlora"), ("mlora", "hydra"), ("hydra-norouter", "hydra")])
    n = trainable(c)
    assert n["mlora"] == n["hydra-norouter"] < n["hydra"] == n["rlora"]
    assert r["paper"]["mlora"]["Avg"] - r["paper"]["rlora"]["Avg"] == pytest.approx(0.78)


def test_05_capacity(tmp_path):
    """Claim 3 from the tiny grid: the matched LoRA's count equals HydraLoRA's within half a rank step; the effective
    rank of ΔW stays within what each architecture allows (HydraLoRA ≤ r: shared A; R-LoRA ≤ 2r: + the frozen
    compensation; the matched LoRA ≤ its rank) and is positive; the comparisons use claim 3's equivalence verdicts."""
    r = run_tutorial("05_capacity.py", tmp_path)
    c = check_claim(r, "3", ["lora-budget", "hydra", "rlora"], [("lora-budget", "hydra"), ("lora-budget", "rlora")])
    n, rank = trainable(c), r["ranks"]["lora-budget"]
    assert abs(n["lora-budget"] - n["hydra"]) <= n["lora-budget"] / rank / 2 and rank > 4
    for label, limit in (("hydra", 4), ("rlora", 8), ("lora-budget", rank)):
        assert 0.0 < r["effective_rank"][label][0] <= limit + 1e-6, label
    # equivalence words from each interval; "borderline" where the bootstrap's and the t interval's differ
    for x in c["report"]["comparisons"]:
        assert x["verdict_boot"] not in STATS_VERDICTS and x["verdict_t"] not in STATS_VERDICTS
        assert x["verdict"] == (x["verdict_boot"] if x["verdict_t"] == x["verdict_boot"] else "borderline")
    # the mechanism cell: the budget by hand equals count_trainable, the rank by hand equals rank_for_budget
    m = mechanism(r)
    for model in ("tiny random Llama", "Qwen2.5-3B"):
        assert m[model]["budget_by_hand"] == m[model]["count_trainable"], model
        assert m[model]["rank_by_hand"] == m[model]["rank_for_budget"], model
    assert m["Qwen2.5-3B"]["count_trainable"] == 14_201_856  # METHODS §1: HydraLoRA r=4 x 3 on Qwen2.5-3B


def test_06_align(tmp_path):
    """Claims 4-6 from the tiny grids: LoRA vs A-LoRA-K vs A-LoRA-M with the probe on every run (separation and
    held-out KL positive), the λ sweep at the paper's four λ converted to our units (λ·T(T−1)/2 with T = 2), each
    paired with LoRA; only the aligned runs log an alignment loss."""
    r = run_tutorial("06_align.py", tmp_path)
    c = check_claim(r, "4-5", ["lora-r8", "a-lora-k", "a-lora-m"], [("a-lora-k", "lora-r8"), ("a-lora-k", "a-lora-m")])
    check_claim(r, "6", ["lora-r8", "a-lora-k-l0.01", "a-lora-k-l0.05", "a-lora-k", "a-lora-k-l0.5"],
                [(k, "lora-r8") for k in ("a-lora-k-l0.01", "a-lora-k-l0.05", "a-lora-k", "a-lora-k-l0.5")])
    assert [s["paper_lambda"] for s in r["sweep"]] == [0.01, 0.05, 0.1, 0.5]
    assert all(s["our_lambda"] == pytest.approx(s["paper_lambda"]) and s["seeds"] == 2 for s in r["sweep"])
    for k in ("lora-r8", "a-lora-k", "a-lora-m"):
        assert r["probe"][k]["sep_ratio"][0] > 0 and r["probe"][k]["heldout_kl"][0] > 0
        assert all((x["align_last5"] > 0) == k.startswith("a-lora") for x in c["curves"][k]), k
    check_paired(r["separation"], [("a-lora-k", "lora-r8"), ("a-lora-m", "lora-r8")])
    # the mechanism cell: the symmetric KL by hand equals the library's to round-off; L_align alone gives the
    # module's A a gradient and its B none
    m = mechanism(r)
    assert m["pairs"] == 3 and m["kl_by_hand"] > 0 and m["max_abs_diff"] < 1e-5 * max(1.0, m["kl_by_hand"])
    assert m["grad_A_norm"] > 0 and m["grad_B_max_abs"] == 0.0


def test_08_rlora_ingredients(tmp_path):
    """Claim 8 from the tiny grid: the ingredients add no parameters (one count for all four rows); the zero-init
    rows (HydraLoRA, +MT) end with more alike heads than the random-init rows (+Init, R-LoRA); the claimed pairs."""
    r = run_tutorial("08_rlora_ingredients.py", tmp_path)
    c = check_claim(r, "8", ["hydra-rs", "hydra+mt", "hydra+init", "rlora"],
                    [("hydra+mt", "hydra-rs"), ("hydra+init", "hydra-rs"), ("rlora", "hydra-rs")])
    assert len(set(trainable(c).values())) == 1
    h = {k: v[0] for k, v in r["head_cosine"].items()}
    assert min(h["hydra-rs"], h["hydra+mt"]) > max(h["hydra+init"], h["rlora"]) + 0.3
    check_paired(r["head_cosine_paired"], [("hydra+mt", "hydra-rs"), ("hydra+init", "hydra-rs")])
    # the mechanism cell, step 0: at a uniform router the head gradients are identical without per-head dropout
    # (random init or not) and differ with it; random init starts the heads near orthogonal, zero init at zero
    rows = mechanism(r)["rows"]
    for k, per_head_dropout, random_init in (("hydra-rs", False, False), ("hydra+mt", True, False),
                                             ("hydra+init", False, True), ("rlora", True, True)):
        spread = rows[k]["grad_spread_uniform_router"]
        assert (spread > 1e-2) if per_head_dropout else (spread <= 1e-6), k
        assert (abs(rows[k]["head_cosine_at_init"]) < 0.3) if random_init else rows[k]["head_cosine_at_init"] is None
        assert -1 <= rows[k]["grad_cosine_kaiming_router"] <= 1


def test_09_align_any_architecture(tmp_path):
    """Claim 9 from the tiny grid: R-LoRA and M-LoRA with and without --align-any; only the aligned runs log an
    alignment loss, the loss adds no parameters, the probe's separation and held-out KL are positive."""
    r = run_tutorial("09_align_any_architecture.py", tmp_path)
    c = check_claim(r, "9", ["rlora", "rlora+align", "mlora", "mlora+align"],
                    [("rlora+align", "rlora"), ("mlora+align", "mlora")])
    n = trainable(c)
    assert n["rlora"] == n["rlora+align"] and n["mlora"] == n["mlora+align"]
    for k, curves in c["curves"].items():
        assert all((x["align_last5"] > 0) == k.endswith("+align") for x in curves), k
        assert r["probe"][k]["sep_ratio"][0] > 0 and r["probe"][k]["heldout_kl"][0] > 0
    check_paired(r["separation"], [("rlora+align", "rlora"), ("mlora+align", "mlora")])
    # the mechanism cell: R-LoRA's A-output is A·x; the loss on it is positive; of the module, only A gets a gradient
    m = mechanism(r)
    assert m["z_vs_Ax_max_abs_diff"] < 1e-6 and m["alignment_loss"] > 0
    assert m["grad_norm"]["A"] > 0 and m["grad_norm"]["B"] == 0.0 and m["grad_norm"]["router"] == 0.0


def test_10_meta_lora(tmp_path):
    """Claim 10 from the tiny grid: MeTA-LoRA and LoRA at K = 64, 16, 256 and the full-data LoRA, all one plain
    LoRA (one trainable count); the tiny pools hold 16 examples per task, so every --shots K keeps them all, in their
    order: each K-shot LoRA run is the full-data run exactly (per seed, per example: the gap is 0) and the three
    MeTA-LoRA rows are one run, while the meta trainer itself gives other numbers (its training CE is the query loss
    after adaptation); the same-K comparisons carry stats.py's verdicts, the full-data ones claim 3's ±1-point ones."""
    r = run_tutorial("10_meta_lora.py", tmp_path)
    labels = ["meta-k64", "lora-k64", "lora-r8", "meta-k16", "lora-k16", "meta-k256", "lora-k256"]
    pairs = [(f"meta-k{k}", b) for k in (64, 16, 256) for b in (f"lora-k{k}", "lora-r8")]
    c = check_claim(r, "10", labels, pairs)
    assert len(set(trainable(c).values())) == 1
    rows, curves = c["report"]["methods"], c["curves"]
    for k in (16, 64, 256):
        assert rows[f"lora-k{k}"]["per_seed"] == rows["lora-r8"]["per_seed"]
        assert curves[f"lora-k{k}"] == curves["lora-r8"] and curves[f"meta-k{k}"] == curves["meta-k64"]
        assert r["gaps"][str(k)]["diff"] == 0.0 and r["gaps"][str(k)]["verdict"] == "no difference"
    assert [x["ce_first5"] for x in curves["meta-k64"]] != [x["ce_first5"] for x in curves["lora-r8"]]
    assert all(x["align_last5"] == 0 for rs in curves.values() for x in rs)  # MeTA-LoRA has no alignment loss
    assert [b["K"] for b in r["by_k"]] == [16, 64, 256]
    for b in r["by_k"]:
        assert b["vs_same_k"]["verdict"] in STATS_VERDICTS and b["vs_full"]["verdict"] not in STATS_VERDICTS
    assert set(r["cost"]) == set(labels) and all(v["step_ms_median"] > 0 for v in r["cost"].values())
    # section 5, grid 10-alpha: the K = 16 comparison at α = 0.01, 0.03, 0.1, 0.3; the 0.03 row is claim 10's run,
    # the others are trained with their own α (other training curves), one table row per method
    a = r["claims"]["10-alpha"]
    alphas = ("meta-k16-a0.01", "meta-k16", "meta-k16-a0.1", "meta-k16-a0.3")
    assert [(x["a"], x["b"]) for x in a["report"]["comparisons"]] == [(m, "lora-k16") for m in alphas]
    assert a["curves"]["meta-k16"] == curves["meta-k16"] and a["curves"]["lora-k16"] == curves["lora-k16"]
    ce = {k: [x["ce_first5"] for x in a["curves"][k]] for k in alphas}
    assert len({tuple(v) for v in ce.values()}) == 4
    assert [row[0] for row in r["alpha"]] == ["LoRA K=16", "MeTA-LoRA K=16 α=0.01", "MeTA-LoRA K=16",
                                              "MeTA-LoRA K=16 α=0.1", "MeTA-LoRA K=16 α=0.3"]
    # the mechanism cell: one first-order episode by hand equals meta_step's gradient to round-off, differs from the
    # plain gradient at θ, and leaves θ unchanged
    m = mechanism(r)
    assert m["max_rel_diff_vs_meta_step"] < 1e-5 and m["max_rel_diff_vs_plain_gradient"] > 1e-3
    assert m["theta_unchanged"] is True


def test_10_full_prints_what_is_known_and_the_gpu_commands(tmp_path):
    """--full trains nothing and writes nothing: the paper's setting is not known (METHODS §2.9), so it says so and
    prints the grid command and a MeTA-LoRA / LoRA train.py pair with --shots."""
    res = subprocess.run([sys.executable, str(TUTORIALS / "10_meta_lora.py"), "--full", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "not found" in res.stdout and "python experiments/claims.py run --only 10" in res.stdout
    assert "--trainer meta" in res.stdout and "--shots 64" in res.stdout
    assert not list(tmp_path.iterdir())


def test_reader_full_prints_the_papers_setting(tmp_path):
    """--full trains nothing and writes nothing: it names the paper's model and the command that runs the grid."""
    res = subprocess.run([sys.executable, str(TUTORIALS / "04_simplified_multi_head.py"), "--full", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Qwen2.5-3B" in res.stdout and "python experiments/claims.py run --only 1-2" in res.stdout
    assert not list(tmp_path.iterdir())


@pytest.fixture
def reader():
    """experiments/reports.py, the claim readers' library (tutorials/common.py on the path, as the tutorials have)."""
    sys.path.insert(0, str(TUTORIALS))
    from experiments import reports
    return reports


def tiny_where(cg, tmp_path):
    import common
    return {"suite": common.tiny_suite(tmp_path), "seeds": [0, 1], "results_dir": tmp_path / "res",
            "work_dir": tmp_path / "work", "controls": False}


def test_reader_on_a_partial_grid(reader, tmp_path, capsys, one_thread):
    """A grid stopped after 6 of its 8 runs: the reader names exactly the missing (method, seed) runs and the
    command that trains them, warns that the seed sets differ, keeps each method's own seeds, and pairs only over the
    seeds both methods have (one for +Init vs HydraLoRA, where the per-run analysis then has no interval)."""
    where = tiny_where(reader, tmp_path)
    reader.C.grid("8", **where).run(limit=6)  # seed-major: all four at seed 0, then hydra-rs and hydra+mt at seed 1
    capsys.readouterr()
    c = reader.Grids(where=where).read("8", script="08_rlora_ingredients.py")
    out = capsys.readouterr().out
    assert c.missing == [("hydra+init", 1), ("rlora", 1)]
    assert "6 of 8 runs cached" in out and "hydra+init (seed 1); rlora (seed 1)" in out
    assert "python experiments/claims.py run --only 8" in out and "08_rlora_ingredients.py --rerun" in out
    assert "different seed sets" in out
    assert c.row("hydra-rs")["seeds"] == [0, 1] and c.row("rlora")["seeds"] == [0]
    assert {(x["a"], x["b"]): x["seeds"] for x in c.report["comparisons"]} == {
        ("hydra+mt", "hydra-rs"): 2, ("hydra+init", "hydra-rs"): 1, ("rlora", "hydra-rs"): 1}
    assert reader.seed_paired(c, "hydra+mt", "hydra-rs", reader.head_cosine, False)["seeds"] == 2
    one = reader.seed_paired(c, "hydra+init", "hydra-rs", reader.head_cosine, False)
    assert one["seeds"] == 1 and one["low"] is None and one["verdict"] == "one seed: no interval"


def test_reader_without_a_suite_says_what_to_run(reader, monkeypatch, capsys):
    """While experiments/claims.py has no SUITE, a reader reads nothing and says so, with the command to run."""
    monkeypatch.setattr(reader.C, "SUITE", None)
    assert reader.Grids().read("4-5", script="06_align.py") is None
    out = capsys.readouterr().out
    assert "NOT MEASURED YET" in out and "python experiments/claims.py run --only 4-5" in out


def test_seed_paired_t_interval(reader):
    """The per-run analyses' paired difference: mean ± t(0.975, n−1)·SE over common seeds, checked by hand on
    three common seeds (differences 0.5, 0.6, 0.7: mean 0.6, SE 0.1/√3, t = 4.303, so [0.352, 0.848]: resolved;
    differences 0.1, 0.2, 0.3 give [−0.048, 0.448]: not resolved); identical values -> "no difference"."""
    runs = lambda vals: [{"seed": s, "v": v} for s, v in enumerate(vals)]  # noqa: E731
    c = reader.Claim("x", {"methods": {}, "comparisons": []}, {"a": runs([1.5, 1.6, 1.7, 9.0]), "b": runs([1, 1, 1]),
                                                               "c": runs([1.1, 1.2, 1.3])},
                     None, [], [0, 1, 2], ["a", "b", "c"], 1)
    x = reader.seed_paired(c, "a", "b", lambda r: r["v"], True)
    assert x["seeds"] == 3 and x["diff"] == pytest.approx(0.6)
    assert (x["low"], x["high"]) == pytest.approx((0.6 - 4.303 * 0.1 / 3 ** 0.5, 0.6 + 4.303 * 0.1 / 3 ** 0.5))
    assert x["verdict"] == "reproduced"
    y = reader.seed_paired(c, "c", "b", lambda r: r["v"], True)
    assert y["low"] == pytest.approx(0.2 - 0.2484, abs=1e-3) and y["verdict"] == "same direction, not resolved"
    assert reader.seed_paired(c, "b", "b", lambda r: r["v"], True)["verdict"] == "no difference"


def test_report_tiny(tmp_path):
    """tutorials/report.py --tiny: the README table from a tiny grid of every claim: one 7-cell row per claim line
    (claims 1-10, the head and separation analyses, claim 2's and 7's exact mechanisms), each measured row with
    its intervals, and the per-task tables of claims 1 and 4 with the paper's Table 1 cells."""
    sys.path.insert(0, str(TUTORIALS))
    import report
    readme = tmp_path / "README.md"
    readme.write_text(f"# prose above\n\n{report.BEGIN}\nan old table\n{report.END}\n\nprose below\n")
    res = subprocess.run([sys.executable, str(TUTORIALS / "report.py"), "--tiny", "--readme", str(readme)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    # --readme: the printed markdown, and nothing else, replaced the old block; the hand-written prose stays
    assert readme.read_text() == (f"# prose above\n\n{report.BEGIN}\n\n{res.stdout.strip()}\n\n{report.END}\n\n"
                                  "prose below\n")
    lines = res.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| claim (tutorial)")))
    table = [line for line in lines[start + 2:] if line.startswith("| ")][:13]
    assert len(table) == 13 and all(line.count(" | ") == 6 for line in table)  # 7 columns
    assert not any("not measured yet" in line for line in table)
    assert sum("[" in line.split(" | ")[3] for line in table) == 11  # every grid row has an interval
    assert table[-1].startswith("| 10. MeTA-LoRA") and "MeTA-LoRA K=16 − LoRA r=8" in table[-1]
    assert "Claims 1-2 per task" in res.stdout and "/ 75.45" in res.stdout and "Claims 4-5 per task" in res.stdout


def test_report_readme_needs_its_markers():
    """--readme refuses a README without the two marker lines (it never guesses where the table goes)."""
    sys.path.insert(0, str(TUTORIALS))
    import report
    with pytest.raises(ValueError, match="add the two lines"):
        report.replace_block("# no markers here\n", "| table |")
    with pytest.raises(ValueError):
        report.replace_block(f"{report.END}\n{report.BEGIN}\n", "| table |")  # in the wrong order
    text = f"a\n{report.BEGIN}\nold\n{report.END}\nb\n"
    assert report.replace_block(text, "\nnew\n") == f"a\n{report.BEGIN}\n\nnew\n\n{report.END}\nb\n"


def test_report_without_runs(reader, tmp_path):
    """An empty cache: every claim row says "not measured yet" and names the command that trains it; the rows at
    each method's own lr (claims 1, 2, 4, 5; not on builtin tasks, which have no dev split) name the lr grid first."""
    table, read = reader.rows(reader.Grids(where=tiny_where(reader, tmp_path)))
    grid_rows = [r for r in table if not r[0].startswith(("2. (mechanism)", "7."))]
    assert len(grid_rows) == 11 and all(r[2] == "not measured yet" and "claims.py run --only" in r[-1]
                                        for r in grid_rows)
    own = [r for r in reader.ROWS if r[1].endswith("@own")]
    assert [r[0][:2] for r in own] == ["1.", "2.", "4.", "5."] and all("own dev-chosen lr" in r[0] for r in own)
    assert reader.not_measured("t", "1-2@own", "p")[-1] == ("train: `python experiments/claims.py run --only lr` "
                                                           "(each method's lr, chosen on dev), then `--only 1-2@own`")
    assert reader.compute_text(read) == "No grid runs cached yet."


def test_pick_data_prepares_real_tasks_or_falls_back(tmp_path, monkeypatch, capsys):
    """The tutorials' data choice: with the original files (a tiny GLUE SST-2 in the original tsv layout) the real
    tasks are prepared once by data/prepare.py; with none, the builtin suite and a printed notice."""
    sys.path.insert(0, str(TUTORIALS))
    import argparse
    import common
    src = tmp_path / "orig" / "glue" / "sst2"
    src.mkdir(parents=True)
    rows = "".join(f"a {'fine' if i % 2 else 'dull'} film number {i}\t{i % 2}\n" for i in range(20))
    (src / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (src / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    monkeypatch.setattr(common, "REAL_TASKS", ("sst2",))
    args = argparse.Namespace(data=None, tiny=False, full=False, source=str(tmp_path / "orig"))
    data, data_dir = common.pick_data(args, data_dir=tmp_path / "prepared")
    assert data == "sst2" and (tmp_path / "prepared" / "glue" / "sst2-train.jsonl").exists()
    args.source = None
    monkeypatch.setattr(common, "default_source", lambda: None)
    data, _ = common.pick_data(args, data_dir=tmp_path / "empty")
    assert data == "builtin" and "NOTICE" in capsys.readouterr().out
    (tmp_path / "other" / "glue").mkdir(parents=True)                      # originals without SST-2 in them
    monkeypatch.setattr(common, "default_source", lambda: tmp_path / "other")
    data, _ = common.pick_data(args, data_dir=tmp_path / "empty")
    assert data == "builtin" and "NOTICE" in capsys.readouterr().out
    args.source = str(tmp_path / "nothing-here")                           # a wrong path given by hand: an error
    with pytest.raises(SystemExit, match="is not a directory"):
        common.pick_data(args, data_dir=tmp_path / "empty")


def test_cached_grids_render_without_data_and_touch_no_tracked_file(tmp_path):
    """A fresh clone (the tracked files, no prepared data, NANOALIGN_DATA_DIR an empty dir) renders a claim tutorial
    and the README report from the committed cache in experiments/results/runs (equal to README.md's generated
    block), writes the tutorial's JSON under the
    git-ignored out/tutorials and leaves the committed tutorials/results as they were; claims.py with a data
    directory that is a file ends in one `error:` line."""
    import shutil
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    for name in files.decode().split("\0"):
        src = ROOT / name
        if name and src.is_file() and not src.is_symlink():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    assert not list((clone / "data").rglob("*.jsonl"))
    committed = {p.name: p.read_bytes() for p in (clone / "tutorials" / "results").iterdir()}
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOALIGN_DATA_DIR": str(tmp_path / "empty")}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=clone,  # noqa
                                      env=env, timeout=600)
    res = run("tutorials/03_head_similarity.py")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"wrote {clone / 'out' / 'tutorials' / '03_head_similarity.json'}" in res.stdout
    out = json.loads((clone / "out" / "tutorials" / "03_head_similarity.json").read_text())
    assert out["mode"] == "read" and len(out["claims"]["1-2"]["report"]["methods"]) >= 4
    res = run("tutorials/report.py")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 4. KL alignment (A-LoRA-K) beats LoRA [")]
    assert len(rows) == 1 and "[" in rows[0] and "distinct runs" in res.stdout
    # the README's generated block is exactly what the committed cache gives (no number in it typed by hand)
    readme = (clone / "README.md").read_text(encoding="utf-8")
    begin = "<!-- generated by tutorials/report.py --readme: begin -->"
    end = "<!-- generated by tutorials/report.py --readme: end -->"
    assert readme[readme.index(begin) + len(begin):readme.index(end)].strip() == res.stdout.strip(), \
        "README.md's table is not the cache's: run python tutorials/report.py --readme"
    assert {p.name: p.read_bytes() for p in (clone / "tutorials" / "results").iterdir()} == committed
    env["NANOALIGN_DATA_DIR"] = str(clone / "README.md")
    res = run("experiments/claims.py", "report", "--only", "4-5")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 1 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "README.md is not a directory: point NANOALIGN_DATA_DIR at" in errors[0]


def test_tutorials_write_out_unless_asked_to_update(reader, tmp_path, monkeypatch):
    """Where the tutorials write: out/tutorials by default (git-ignored), out/tutorials-tiny with --tiny, the
    committed tutorials/results only with --update (or --out naming it); --tiny --update is refused, and so is
    --update on the builtin synthetic tasks (tutorial 02 without the real data must not replace its real-task
    results)."""
    import argparse
    import common
    for p in (common.parser("doc"), common.reader_parser("doc")):
        assert p.parse_args([]).out == common.OUT and not p.parse_args([]).update
        assert p.parse_args(["--tiny"]).out == common.TINY_OUT
        assert p.parse_args(["--update"]).out == common.RESULTS and p.parse_args(["--update"]).update
        assert p.parse_args(["--out", str(common.RESULTS)]).update
        assert p.parse_args(["--out", str(tmp_path)]).out == tmp_path
        with pytest.raises(SystemExit, match="^error: --tiny would write its smoke-test results over the committed"):
            p.parse_args(["--tiny", "--update"])
    monkeypatch.setattr(common, "default_source", lambda: None)
    args = argparse.Namespace(data=None, tiny=False, full=False, source=None, update=True)
    with pytest.raises(SystemExit, match="^error: --update would replace the committed real-task results"):
        common.pick_data(args, data_dir=tmp_path / "empty")
    args.data = "builtin"
    with pytest.raises(SystemExit, match="^error: --update would replace"):
        common.pick_data(args, data_dir=tmp_path / "empty")
    args.update = False
    assert common.pick_data(args, data_dir=tmp_path / "empty")[0] == "builtin"


def test_reader_lists_a_damaged_run_as_missing(reader, tmp_path, capsys, one_thread):
    """A cached run file cut in half: the reader (and the report built on it) renders the rest, names the file as
    damaged and moved aside, and lists the run as missing with the command that trains it again."""
    where = {**tiny_where(reader, tmp_path), "seeds": [0]}
    g = reader.C.grid("4-5", **where)
    g.run()
    path = g.path("a-lora-m", 0)
    path.write_text(path.read_text()[:1000])
    capsys.readouterr()
    c = reader.Grids(where=where).read("4-5", script="06_align.py")
    out, err = capsys.readouterr()
    assert c.missing == [("a-lora-m", 0)] and c.damaged == (path.name,) and "a-lora-m" not in c.report["methods"]
    assert f"damaged and moved aside: {path.name}" in out and "python experiments/claims.py run --only 4-5" in out
    assert err.count(f"damaged cached run {path}: not valid JSON") == 1

"""Smoke tests of tutorials/: each runs end to end in `--tiny` mode (a 2-layer random Llama built in code, a handful
of steps) in a subprocess, writing to a temp dir (`--out`), and its results JSON is checked against what the
tutorial demonstrates: exact zero-init, merges equal to fp32 round-off, METHODS §1 parameter counts, which adapters
can merge, identical heads for HydraLoRA without router. The committed results in tutorials/results are not touched.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
MERGEABLE = {"lora": True, "align": True, "hydra": False, "hydra-norouter": True, "rlora": False, "mlora": True,
             "mtl": False, "multilora": True}  # METHODS §2 "Mergeable" lines and §7 claim 7
VERDICTS = {"reproduced", "same direction, within noise", "opposite, within noise", "contradicted", "no difference"}


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


def test_03_head_similarity(tmp_path):
    """Trains HydraLoRA, R-LoRA and M-LoRA with train.train for 2 seeds and aggregates: one row per seed and method,
    cosines in [-1, 1] for every (layer, module), router statistics only where there is a router, and the
    zero-init symmetry: HydraLoRA's heads end far more alike than R-LoRA's/M-LoRA's independent random heads."""
    r = run_tutorial("03_head_similarity.py", tmp_path)
    assert set(r["runs"]) == {"hydra", "rlora", "mlora"} and r["seeds"] == 2
    for method, rows in r["runs"].items():
        assert [row["seed"] for row in rows] == [0, 1]
        for row in rows:
            for per_layer in row["cos_by_module_per_layer"].values():
                assert len(per_layer) == 2 and all(-1.0 <= c <= 1.0 for c in per_layer)
            assert 1 / 3 - 1e-6 <= row["top1_energy_mean"] <= 1.0
            assert (row["router"] is None) == (method == "mlora")
            if row["router"]:
                assert 0.0 < row["router"]["entropy_over_logN"] <= 1.0 + 1e-6
    s = r["summary"]
    assert s["hydra"]["cos_mean"]["min"] > max(s["rlora"]["cos_mean"]["max"], s["mlora"]["cos_mean"]["max"]) + 0.3
    assert s["hydra"]["cos_mean"]["min"] <= s["hydra"]["cos_mean"]["mean"] <= s["hydra"]["cos_mean"]["max"]
    assert set(r["verdict"]) >= {"reproduced", "mlora_highest_mean", "mlora_highest_separated"}


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



def check_grid(r, setups, seeds=(0, 1)):
    """Rows of a methods x seeds grid (tutorials/common.py Experiment): one per seed, accuracies in [0, 100] with the
    average equal to the mean over tasks, summaries whose mean lies inside their seed range."""
    assert list(r["runs"]) == setups and r["seeds"] == list(seeds)
    for label, rows in r["runs"].items():
        assert [row["seed"] for row in rows] == list(seeds)
        for row in rows:
            acc = row["accuracy"]
            assert set(acc) == {*r["tasks"], "average"} and all(0.0 <= v <= 100.0 for v in acc.values())
            assert abs(acc["average"] - sum(acc[t] for t in r["tasks"]) / len(r["tasks"])) < 1e-9
            assert row["trainable"] > 0 and row["ce_first5"] > 0 and row["step_ms_median"] > 0
        s = r["summary"][label]["average"]
        assert s["min"] <= s["mean"] <= s["max"] and s["n"] == len(seeds)
    assert 0.0 <= r["base"]["average"] <= 100.0


def test_04_simplified_multi_head(tmp_path):
    """Four multi-head adapters x 2 seeds through train.train and the log-likelihood scorer; the parameter counts
    order as METHODS §1 says (no router = fewer), and each claim gets a verdict in the four words the README uses."""
    r = run_tutorial("04_simplified_multi_head.py", tmp_path)
    check_grid(r, ["hydra", "hydra-norouter", "rlora", "mlora"])
    n = {k: rows[0]["trainable"] for k, rows in r["runs"].items()}
    assert n["mlora"] == n["hydra-norouter"] < n["hydra"] == n["rlora"]
    for key in ("claim1_mlora_vs_rlora", "claim1_mlora_vs_hydra", "claim2_norouter_vs_hydra"):
        v = r["verdict"][key]
        assert v["verdict"] in VERDICTS and v["se"] >= 0
        assert v["paper_diff"] == pytest.approx({"claim1_mlora_vs_rlora": 0.78, "claim1_mlora_vs_hydra": 1.41,
                                                 "claim2_norouter_vs_hydra": -0.46}[key])


def test_05_capacity(tmp_path):
    """The matched rank reproduces HydraLoRA's parameter budget within one rank step; the ΔW spectra have at most r
    non-zero values for LoRA r and HydraLoRA (shared A), at most 2r for R-LoRA (+ frozen compensation) and at most
    the matched rank for the matched LoRA."""
    r = run_tutorial("05_capacity.py", tmp_path)
    m = r["matched_rank"]
    check_grid(r, ["lora-r4", f"lora-r{m} (matched)", "hydra", "rlora"])
    n = {k: rows[0]["trainable"] for k, rows in r["runs"].items()}
    per_rank = n["lora-r4"] // 4
    assert abs(n[f"lora-r{m} (matched)"] - n["hydra"]) <= per_rank / 2 + 1 and n["hydra"] == r["budget"]
    for label, limit in (("lora-r4", 4), ("hydra", 4), ("rlora", 8), (f"lora-r{m} (matched)", m)):
        for row in r["runs"][label]:
            assert 0 < row["numerical_rank"] <= limit and 0 < row["effective_rank"] <= limit + 1e-6
    assert r["verdict"]["matched_vs_hydra"]["verdict"] in {"reproduced (not worse)", "contradicted"}


def test_06_align(tmp_path):
    """LoRA vs A-LoRA-K vs A-LoRA-M and the λ sweep, 2 seeds: plain LoRA logs no alignment loss and the aligned runs
    do; the held-out KL and task separation are finite and positive; a fresh adapter's representation is probed per
    seed; the PCA coordinates cover every probe prompt."""
    r = run_tutorial("06_align.py", tmp_path)
    check_grid(r, ["lora", "align-kl", "align-mmd", "align-kl λ=1"])
    assert all(row["align_last5"] == 0.0 for row in r["runs"]["lora"])
    assert all(row["align_last5"] > 0.0 for k in ("align-kl", "align-mmd") for row in r["runs"][k])
    for rows in [r["fresh_adapter"], *r["runs"].values()]:
        for row in rows:
            assert row["sep_ratio"] > 0 and row["sep_within"] > 0 and row["heldout_kl"] > 0
    pc = r["fresh_adapter"][0]["pca"]
    assert len(pc["xy"]) == len(pc["task_ids"]) == 4 * len(r["tasks"]) and 0 < sum(pc["share"]) <= 1 + 1e-6
    assert set(r["verdict"]["claim6_sweep"]) == {"0.1", "1"}


def test_08_rlora_ingredients(tmp_path):
    """The four-way ablation through train.train with --adapter-options: every setup has R-LoRA's parameter count
    (the ingredients add none), the zero-init setups (hydra, +MT) end with more alike heads than the random-init
    ones, and each claim gets a verdict with the paper's difference (METHODS §6.1 Table 4)."""
    r = run_tutorial("08_rlora_ingredients.py", tmp_path)
    check_grid(r, ["hydra", "hydra+mt", "hydra+init", "rlora"])
    assert len({rows[0]["trainable"] for rows in r["runs"].values()}) == 1
    c = r["head_cosine"]
    assert min(c["hydra"]["min"], c["hydra+mt"]["min"]) > max(c["hydra+init"]["max"], c["rlora"]["max"]) + 0.3
    assert r["verdict"]["claim8_both_vs_hydra"]["paper_diff"] == pytest.approx(73.59 - 72.69)
    assert all(r["verdict"][k]["verdict"] in VERDICTS for k in r["verdict"] if k.startswith(("claim", "mechanism")))


def test_09_align_any_architecture(tmp_path):
    """R-LoRA and M-LoRA with and without --align-any: only the aligned runs log an alignment loss, the probe's
    separation and held-out KL are finite and positive, and both claims get a verdict."""
    r = run_tutorial("09_align_any_architecture.py", tmp_path)
    check_grid(r, ["rlora", "rlora+align", "mlora", "mlora+align"])
    for label, rows in r["runs"].items():
        assert all((row["align_last5"] > 0) == label.endswith("+align") for row in rows), label
        assert all(row["sep_ratio"] > 0 and row["heldout_kl"] > 0 for row in rows)
    assert r["runs"]["rlora"][0]["trainable"] == r["runs"]["rlora+align"][0]["trainable"]
    assert {"claim9_rlora", "claim9_mlora"} <= set(r["verdict"])


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


def test_report_builds_the_readme_table_from_committed_results():
    """tutorials/report.py turns the committed results JSON into the README's claim table: one 4-cell row per claim,
    no cell broken by a stray '|', and every tutorial that measures a claim has its JSON committed."""
    res = subprocess.run([sys.executable, str(TUTORIALS / "report.py")], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    table = [line for line in res.stdout.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    assert len(table) >= 11
    assert all(line.count(" | ") == 3 for line in table)
    assert not any("not run" in line or "not measured" in line for line in table)

"""The claim grids (experiments/claims.py) on the tiny random Llama: methods, λ units, the budget rank, and a
claim report built from cached runs (paired comparisons with intervals and verdicts, every method against the
base model)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import claims as C  # noqa: E402
from experiments import grid as G  # noqa: E402

from nanoalign.model import ModelConfig  # noqa: E402
from experiments.stats import VERDICTS  # noqa: E402

SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "max_position_embeddings": 8192}


def test_lambda_units_and_budget_rank():
    """λ in the paper's units (a sum over task pairs) is ours (a mean over pairs) times T(T−1)/2; the LoRA rank at
    HydraLoRA's budget (rank 4, 3 heads, router, gate/up/down) is 10 on SmolLM2-135M's shapes."""
    assert C.lam(0.1, 5) == pytest.approx(1.0) and C.lam(0.1, 4) == pytest.approx(0.6)
    assert C.budget_rank(ModelConfig.from_hf_dict(SMOLLM2)) == 10


def test_methods_are_the_papers_configurations():
    """Rank 4 x 3 heads on gate/up/down for the multi-head family, rank 8 for Align-LoRA (KL and MMD at the paper's
    λ = 0.1), R-LoRA's two ingredients switched off one at a time for claim 8; every claim's labels exist."""
    m = C.methods(5, ModelConfig.from_hf_dict(SMOLLM2))
    for k in ("hydra", "hydra-norouter", "rlora", "mlora"):
        assert (m[k].options["rank"], m[k].options["heads"], m[k].options["targets"]) == (4, 3, C.MLP)
    assert m["a-lora-k"].options == {"adapter": "align", "rank": 8, "targets": C.MLP, "align_loss": "kl",
                                     "align_lambda": 1.0}
    assert m["a-lora-m"].options["align_loss"] == "mmd" and m["lora-budget"].options["rank"] == 10
    assert m["hydra+mt"].options["adapter_options"] == "random_init=false"
    assert m["rlora+align"].options["align_any"] is True
    for labels, _, comparisons in C.CLAIMS.values():
        own = {k[:-len(C.OWN)] for k in labels if k.endswith(C.OWN)}  # resolved from the lr grid (test below)
        assert own <= set(C.LR_METHODS) and {k for k in labels if not k.endswith(C.OWN)} <= set(m)
        assert all(a in labels and b in labels for a, b, _, _ in comparisons)


def test_claim_report_from_cached_runs(tiny, tmp_path, one_thread):
    """A claim grid on the tiny model (2 seeds, 3 steps) and its report: one row per method (mean ± SE over seeds,
    its paired comparison with the base model), and each claimed comparison with its interval and verdict."""
    suite = G.Suite(("alphabet-first", "colour-review"), model=str(tiny), steps=3, batch_per_task=1, lr=1e-2,
                    warmup=1, seq_len=64, train_pool=16, test_per_task=6, data_dir=str(tmp_path), probe_examples=2)
    where = dict(suite=suite, seeds=[0, 1], results_dir=tmp_path / "res", work_dir=tmp_path / "w")
    C.grid("1-2", **where).run()
    rep = C.claim_report("1-2", **where)
    assert set(rep["methods"]) == {"hydra", "hydra-norouter", "rlora", "mlora", *C.CONTROLS_1_2}
    assert rep["base"] is not None
    row = rep["methods"]["mlora"]
    assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2 and "head_cosine" in row and "vs_base" in row
    assert [(c["a"], c["b"]) for c in rep["comparisons"]] == [
        ("mlora", "rlora"), ("mlora", "hydra"), ("hydra-norouter", "hydra"), ("mlora-mean", "rlora"),
        ("mlora-mean", "hydra"), ("mlora-cf", "rlora-cf"), ("mlora-cf", "hydra"), ("hydra-norouter-mean", "hydra")]
    for c in rep["comparisons"]:
        assert c["low"] <= c["diff"] <= c["high"] and c["verdict"] in VERDICTS and c["seeds"] == 2


# every method defined before claim 10, by label -> its run key (stub data fingerprints), digested: adding methods
# must leave these keys alone, or every cached run of experiments/results/runs/ would be orphaned
KEYS_BEFORE_CLAIM_10 = "03b5784a6ab19653"


def test_claim_10_methods_share_lora_r8_and_leave_earlier_keys_alone():
    """Claim 10 (MeTA-LoRA): for K = 64 (first), 16, 256 a MeTA-LoRA and a standard-trainer row that are `lora-r8`'s
    options plus --shots K (and the meta trainer with 2 + 2 episode examples: the standard trainer's 2 per task per
    step, and support + query within K = 16, which MetaSampler accepts); `lora-r8` itself is the full-data row shared
    with claim 4-5; every option is a train.TrainConfig field and passes train.py's checks; the run keys of the claim
    are distinct, and those of every earlier method equal the digest pinned at the commit that added claim 10."""
    import hashlib
    import json
    from types import SimpleNamespace

    from nanoalign.meta import MetaConfig, MetaSampler
    from nanoalign.plumbing import launch

    m = C.methods(3, ModelConfig.from_hf_dict(SMOLLM2))
    labels, seeds, comparisons = C.CLAIMS["10"]
    assert labels[:3] == ["meta-k64", "lora-k64", "lora-r8"] and seeds == C.SEEDS and C.SHOTS[0] == 64
    assert "lora-r8" in C.CLAIMS["4-5"][0]
    assert set(labels) == {"lora-r8", *(f"{kind}-k{k}" for k in (16, 64, 256) for kind in ("meta", "lora"))}
    assert [(a, b, s) for a, b, s, _ in comparisons] == [
        (f"meta-k{k}", b, s) for k in (64, 16, 256) for b, s in ((f"lora-k{k}", True), ("lora-r8", None))]
    base = m["lora-r8"].options
    for k in (16, 64, 256):
        assert m[f"lora-k{k}"].options == {**base, "shots": k}
        assert m[f"meta-k{k}"].options == {**base, "shots": k, "trainer": "meta", "meta_support": 2, "meta_query": 2}
    # the α sensitivity grid: the K = 16 pair of claim 10 plus MeTA-LoRA at the other inner learning rates, each
    # compared with the same LoRA on 16 (its default-α row is claim 10's run, not a second one)
    alpha_labels, alpha_seeds, alpha_comparisons = C.CLAIMS["10-alpha"]
    assert alpha_labels == ["lora-k16", "meta-k16-a0.01", "meta-k16", "meta-k16-a0.1", "meta-k16-a0.3"]
    assert alpha_seeds == C.SEEDS
    assert [(a, b, s) for a, b, s, _ in alpha_comparisons] == [
        (a, "lora-k16", True) for a in ("meta-k16-a0.01", "meta-k16", "meta-k16-a0.1", "meta-k16-a0.3")]
    for a in C.META_ALPHAS:
        assert m[f"meta-k16-a{a}"].options == {**m["meta-k16"].options, "meta_inner_lr": a}
    data = SimpleNamespace(test_fp="test", train_fp="train", dev_fp=None)  # run_key reads only these of Data
    keys = {}
    for label, method in m.items():
        cfg = G.train_config(C.SUITE, method.options, 0, "w")  # raises on an option train.py does not have
        keys[label] = G.run_key(cfg, C.SUITE, data)
        launch.check_config(cfg)
        if cfg.trainer == "meta":
            pools = {t: [None] * min(C.SHOTS) for t in C.SUITE.tasks}  # the smallest K-shot pools
            assert MetaSampler(pools, MetaConfig.from_flags(cfg)).n == len(C.SUITE.tasks)
            assert cfg.meta_query == C.SUITE.batch_per_task
    assert len({keys[k] for k in labels}) == len(labels)
    assert len({keys[k] for k in {*labels, *alpha_labels}}) == len(labels) + len(C.META_ALPHAS)
    claim_10 = {*labels, *alpha_labels}
    # the lr grid runs on the suite with a dev split: its keys differ from every run on SUITE, the 1e-3 rows too
    dev_data = SimpleNamespace(test_fp="test", train_fp="train", dev_fp="dev")
    lr_keys = {G.run_key(G.train_config(C.DEV_SUITE, m[k].options, 0, "w"), C.DEV_SUITE, dev_data)
               for k in C.CLAIMS["lr"][0]}
    assert len(lr_keys) == len(C.CLAIMS["lr"][0]) and not lr_keys & set(keys.values())
    controls = {*C.CONTROLS_1_2, *C.CONTROLS_8}  # added later, with keys of their own
    assert len({keys[k] for k in controls}) == len(controls) and not {keys[k] for k in controls} & {
        v for k, v in keys.items() if k not in controls and "@lr" not in k}
    before = {k: v for k, v in sorted(keys.items()) if (k not in claim_10 or k == "lora-r8") and k not in controls
              and "@lr" not in k}
    assert hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16] == KEYS_BEFORE_CLAIM_10


def test_cli_runs_a_subset_and_report_only_keeps_the_other_claims(tmp_path, monkeypatch):
    """`run --only 10 --seeds 0 --methods meta-k64,lora-k64` trains just those rows of that seed; an unknown method
    is one error line; `report --only 3` rewrites claim 3 in experiments/claims.json and keeps every other claim."""
    import json
    from types import SimpleNamespace

    ran = []

    def fake_grid(claim, seeds=None, **_):
        g = SimpleNamespace(methods={k: None for k in C.CLAIMS[claim][0]}, seeds=seeds, busy=[], damaged=[])
        g.run = lambda: ran.append((claim, sorted(g.methods), g.seeds))
        g.missing = lambda: []
        return g

    monkeypatch.setattr(C, "grid", fake_grid)
    monkeypatch.setattr(C, "claim_report", lambda c, g=None: {"claim": c, "comparisons": [], "new": True})
    monkeypatch.setattr(C, "ROOT", tmp_path)
    (tmp_path / "experiments").mkdir()
    out = tmp_path / "experiments" / "claims.json"
    out.write_text(json.dumps({"1-2": {"claim": "1-2", "old": True}, "3": {"claim": "3", "old": True}}))
    C.main(["run", "--only", "10", "--seeds", "0", "--methods", "meta-k64,lora-k64"])
    assert ran == [("10", ["lora-k64", "meta-k64"], [0])]
    report = json.loads(out.read_text())
    assert report["1-2"] == {"claim": "1-2", "old": True} and report["3"]["old"] and report["10"]["new"]
    C.main(["report", "--only", "3"])
    report = json.loads(out.read_text())
    assert report["3"]["new"] and report["1-2"]["old"] and list(report) == ["1-2", "3", "10"]
    with pytest.raises(SystemExit, match="--methods hydra: no such method in claims 10"):
        C.main(["run", "--only", "10", "--methods", "hydra"])


def test_equivalence_verdicts():
    """Claims 3 and 10 ("A matches B") by where the interval of A − B lies against ±1 point and 0."""
    v = C.equivalence_verdict
    assert v(-0.8, 0.9) == "equivalent within ±1 point" and v(-0.5, 1.9) == "not worse (interval above −1)"
    assert v(-3.0, -1.2) == "worse" and v(-3.8, -0.07) == "below (interval under 0)"
    assert v(-1.0, 1.4) == "not resolved" and v(-2.0, 0.5) == "not resolved"


def test_recheck_cli_needs_runs_named():
    """`claims.py recheck` retrains, so it refuses to guess: no --methods or --seeds is one error line, and so is a
    method that is in none of the selected claims."""
    with pytest.raises(SystemExit, match="recheck needs --methods"):
        C.main(["recheck", "--only", "4-5", "--seeds", "0"])
    with pytest.raises(SystemExit, match="recheck needs --methods"):
        C.main(["recheck", "--only", "4-5", "--methods", "lora-r8"])
    with pytest.raises(SystemExit, match="--methods hydra: no such method in claims 4-5"):
        C.main(["recheck", "--only", "4-5", "--seeds", "0", "--methods", "hydra,base"])


def test_step_size_and_init_controls():
    """The controls of claims 1, 2 and 8 are their base method with one option changed: heads averaged instead of
    summed (M-LoRA, Hydra w/o router), or R-LoRA's released-code init (R-LoRA, M-LoRA, HydraLoRA +Init)."""
    m = C.methods(3, ModelConfig.from_hf_dict(SMOLLM2))
    for label, base, extra in (("mlora-mean", "mlora", "head_reduction=mean"),
                               ("hydra-norouter-mean", "hydra-norouter", "head_reduction=mean"),
                               ("rlora-cf", "rlora", "code_faithful=true"), ("mlora-cf", "mlora", "code_faithful=true"),
                               ("hydra+init-cf", "hydra+init", "multi_head_dropout=false,code_faithful=true")):
        o = dict(m[label].options)
        assert o.pop("adapter_options") == extra and o == {k: v for k, v in m[base].options.items()
                                                           if k != "adapter_options"}
        assert m[label].analyses == m[base].analyses and "heads" in m[label].analyses


def test_lr_grid_and_own_lr_rows(monkeypatch):
    """The lr grid: every LR_METHODS method at every lr of LRS (its options otherwise unchanged), 3 seeds, on the
    suite with a dev split; chosen_lrs picks, per method, the lr of the highest mean dev accuracy, and only once every
    lr has every seed of the lr grid (the same seeds at every lr is not enough); a claim's @own rows are those
    methods at their chosen lr, and a method without one has no row yet."""
    m = C.methods(3, ModelConfig.from_hf_dict(SMOLLM2))
    labels, seeds, comparisons = C.CLAIMS["lr"]
    assert seeds == C.SEEDS[:3] and not comparisons and len(labels) == len(C.LR_METHODS) * len(C.LRS)
    for base in C.LR_METHODS:
        for lr in C.LRS:
            o = dict(m[f"{base}@lr{lr:g}"].options)
            assert o.pop("lr") == lr and o == m[base].options
    assert C.DEV_SUITE.dev_per_task == 300 and C.SUITE.dev_per_task == 0
    row = lambda dev, seeds=(0, 1, 2): {"dev_average": (dev, 0.1), "seeds": list(seeds)}  # noqa: E731
    report = {"methods": {"mlora@lr0.0003": row(60.0), "mlora@lr0.001": row(58.0), "mlora@lr0.003": row(55.0),
                          "hydra@lr0.0003": row(60.0), "hydra@lr0.001": row(61.0, (0, 1)),
                          **{f"rlora@lr{lr:g}": row(60.0 + i, (0,)) for i, lr in enumerate(C.LRS)}}}
    chosen = C.chosen_lrs(report)
    assert chosen["mlora"] == {"lr": 3e-4, "dev": {3e-4: 60.0, 1e-3: 58.0, 3e-3: 55.0}}
    assert chosen["hydra"]["lr"] is None and chosen["lora-r8"]["lr"] is None  # incomplete / not run
    assert chosen["rlora"]["lr"] is None  # every lr at seed 0 only: one seed chooses nothing
    monkeypatch.setattr(C, "model_config", lambda name: ModelConfig.from_hf_dict(SMOLLM2))
    monkeypatch.setattr(C, "dev_means", lambda g: report)
    g = C.grid("1-2@own")
    assert list(g.methods) == ["mlora@own"] and g.methods["mlora@own"].options == {**m["mlora"].options, "lr": 3e-4}


def test_lr_table_shows_dev_means_seed_counts_and_the_chosen_lr():
    """reports.lr_table (the README's lr grid): one row per method, each lr's dev mean ± SE with its seed count, "–"
    where not run, and the chosen lr only once every lr has every seed (chosen_lrs)."""
    from experiments import reports
    row = lambda dev, seeds=(0, 1, 2): {"dev_average": (dev, 0.5), "seeds": list(seeds), "wall_s": 1800}  # noqa: E731
    methods = {"mlora@lr0.0003": row(60.0), "mlora@lr0.001": row(58.0), "mlora@lr0.003": row(55.0),
               "hydra@lr0.0003": row(61.0, (0,))}
    labels, seeds, _ = C.CLAIMS["lr"]
    c = reports.Claim("lr", {"methods": methods, "suite": {"dev_per_task": 300}, "comparisons": []}, {}, None, [],
                      seeds, labels, 1)
    text = reports.lr_table(c)
    assert "| M-LoRA | 60.0 ± 0.5 (3 seeds) | 58.0 ± 0.5 (3 seeds) | 55.0 ± 0.5 (3 seeds) | 0.0003 |" in text
    assert "| HydraLoRA | 61.0 ± 0.5 | – | – | not yet |" in text and "| LoRA r=8 | – | – | – | not yet |" in text
    assert "(10 of 72 runs, 2.0 h of wall time)" in text and "300 examples per task" in text

"""The claim grids (experiments/claims.py) on the tiny random Llama: methods, λ units, the budget rank, and a
claim report built from cached runs (paired comparisons with intervals and verdicts, every method against the
base model)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))
import claims as C  # noqa: E402
import grid as G  # noqa: E402

from nanoalign.model import ModelConfig  # noqa: E402
from nanoalign.stats import VERDICTS  # noqa: E402

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
        assert set(labels) <= set(m) and all(a in labels and b in labels for a, b, _, _ in comparisons)


def test_claim_report_from_cached_runs(tiny, tmp_path, one_thread):
    """A claim grid on the tiny model (2 seeds, 3 steps) and its report: one row per method (mean ± SE over seeds,
    its paired comparison with the base model), and each claimed comparison with its interval and verdict."""
    suite = G.Suite(("alphabet-first", "colour-review"), model=str(tiny), steps=3, batch_per_task=1, lr=1e-2,
                    warmup=1, seq_len=64, train_pool=16, test_per_task=6, data_dir=str(tmp_path), probe_examples=2)
    where = dict(suite=suite, seeds=[0, 1], results_dir=tmp_path / "res", work_dir=tmp_path / "w")
    C.grid("1-2", **where).run()
    rep = C.claim_report("1-2", **where)
    assert set(rep["methods"]) == {"hydra", "hydra-norouter", "rlora", "mlora"} and rep["base"] is not None
    row = rep["methods"]["mlora"]
    assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2 and "head_cosine" in row and "vs_base" in row
    assert [(c["a"], c["b"]) for c in rep["comparisons"]] == [("mlora", "rlora"), ("mlora", "hydra"),
                                                              ("hydra-norouter", "hydra")]
    for c in rep["comparisons"]:
        assert c["low"] <= c["diff"] <= c["high"] and c["verdict"] in VERDICTS and c["seeds"] == 2

"""experiments/rescore_sst2.py: the README's SST-2 re-scoring on lm-eval's strings is what its cache gives."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments import rescore_sst2 as R  # noqa: E402


def run(label, seed, cloze, lm, key=None, grid="claim-x"):
    return {"label": label, "grid": grid, "seed": seed, "cloze": cloze, "lm-eval": lm, "same_as_cache": True,
            "flips": 10, "n": 500, "positive": {"cloze": "0011", "lm-eval": "0111"}}


def test_the_readme_block_is_the_committed_cache():
    """README.md's block is exactly the rendering of experiments/results/sst2_lm_eval.json (no number typed by
    hand); run `python experiments/rescore_sst2.py readme` after `run`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert R.BEGIN in text and R.END in text
    assert R.render_readme(text, json.loads(R.CACHE.read_text())) == text, "python experiments/rescore_sst2.py readme"


def test_record_counts_flips_and_positive_shares_and_checks_the_cache():
    cached = {"label": "a", "grid": "g", "seed": 0, "tasks": {"sst2": {"accuracy": 0.5}},
              "predictions": {"sst2": {"pred": ["positive", "negative"], "index": [3, 7]}}}
    scored = {"cloze": (["positive", "negative"], 0.5), "lm-eval": ([" positive", "positive"], 1.0)}
    r = R.record(cached, scored, [3, 7], 1.0)
    assert r["flips"] == 1 and r["positive"] == {"cloze": "10", "lm-eval": "11"} and R.share(r, "cloze") == 0.5
    assert not R.record(cached, scored, [3, 8], 1.0)["same_as_cache"]  # other examples: not the cached run
    assert r["same_as_cache"]
    flipped = {**scored, "cloze": (["negative", "negative"], 0.5)}
    assert not R.record(cached, flipped, [3, 7], 1.0)["same_as_cache"]


def test_paired_differences_use_common_seeds_and_show_a_constant_shift_exactly():
    """A method 2 points above another at every seed on both string sets: +2.00 [+2.00, +2.00] in both columns;
    a pair with fewer than 3 common seeds, or from different grids, gets no row."""
    runs = {f"{k}{s}": run(k, s, base + 0.01 * s, base + 0.01 * s + 0.005) for k, base in (("a", 0.62), ("b", 0.60))
            for s in range(3)}
    runs["c0"] = run("c", 0, 0.5, 0.5)
    runs["d0"] = run("d", 0, 0.5, 0.5, grid="claim-y")
    text = R.render({"runs": runs})
    assert "| a − b (claim-x) | 3 | +2.00 [+2.00, +2.00] | +2.00 [+2.00, +2.00] |" in text
    pairs = text[text.index("Paired differences"):]
    assert "| c (claim-x) | 1 | 50.0 (1 seed) | 50.0 (1 seed) | +0.0 |" in text and " c (" not in pairs and " d (" not in pairs
    assert "| a (claim-x) | 3 | 63.0 ± 0.6 | 63.5 ± 0.6 | +0.5 | 10 | 50 → 75 |" in text


def test_missing_data_and_a_damaged_cache_end_in_one_line(tmp_path, monkeypatch):
    """`run` without prepared SST-2 and `readme` from a cut-short cache: one `error:` line naming the file, and the
    README untouched."""
    import pytest
    with pytest.raises(SystemExit, match=r"^error: .*sst2-test\.jsonl not found: run `python data/prepare.py glue"):
        R.main(["run", "--data", str(tmp_path / "none")])
    damaged = tmp_path / "sst2_lm_eval.json"
    damaged.write_text(R.CACHE.read_text()[:100])
    monkeypatch.setattr(R, "CACHE", damaged)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match=r"^error: .*sst2_lm_eval\.json:\d+: not valid JSON"):
        R.main(["readme"])
    assert (ROOT / "README.md").read_text(encoding="utf-8") == readme

"""The README's "What the tutorials show" table, built from the results JSON the tutorials wrote (no number typed by
hand): claim by claim (METHODS.md §7), the paper's number (§6), our measurement, and the verdict.

    python tutorials/report.py                     # reads tutorials/results/*.json, prints markdown
    python tutorials/report.py --results DIR

A tutorial whose JSON is missing gets a row saying so.
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(results, name):
    path = Path(results) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ms(s, digits=1):
    """'mean ± std' of a spread dict."""
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def diff(v):
    return f"{v['diff']:+.2f} ± {v['se']:.2f}"


def weak(v):
    """Claim 3's verdict, saying when 'not worse' only means 'within seed noise'."""
    if v["verdict"].startswith("reproduced") and not v["clear"]:
        return "consistent: not clearly worse (within seed noise)"
    return v["verdict"]


def rows(results):
    out = []
    r02, r03, r04, r05, r06, r07, r08, r09 = (load(results, n) for n in (
        "02_multi_head_family", "03_head_similarity", "04_simplified_multi_head", "05_capacity", "06_align", "07_cost",
        "08_rlora_ingredients", "09_align_any_architecture"))
    missing = lambda n: (n, "–", "not run (no results JSON)", "–")  # noqa: E731

    # claim 1: accuracy and head similarity
    if r04:
        s, v = r04["summary"], r04["verdict"]
        ours = (f"M-LoRA {ms(s['mlora']['average'])}, R-LoRA {ms(s['rlora']['average'])}, HydraLoRA "
                f"{ms(s['hydra']['average'])} (base {r04['base']['average']:.1f}); M-LoRA − R-LoRA "
                f"{diff(v['claim1_mlora_vs_rlora'])}, − HydraLoRA {diff(v['claim1_mlora_vs_hydra'])}")
        out.append(("1. simplified multi-head (M-LoRA) ≥ R-LoRA, HydraLoRA [04]",
                    "75.45 / 74.67 / 74.04 (Qwen2.5-3B, 5 tasks)", ours,
                    f"{v['claim1_mlora_vs_rlora']['verdict']} (vs R-LoRA); "
                    f"{v['claim1_mlora_vs_hydra']['verdict']} (vs HydraLoRA)"))
    else:
        out.append(missing("1. M-LoRA ≥ R-LoRA, HydraLoRA [04]"))
    if r03:
        s = r03["summary"]
        ours = ", ".join(f"{k} {ms(s[k]['cos_mean'], 3)}" for k in ("hydra", "rlora", "mlora") if k in s)
        rep = r03["verdict"]["reproduced"] if r03.get("verdict") else None
        out.append(("1. heads end up alike, M-LoRA's the most [03]",
                    "HydraLoRA ≈0.76-0.80 per module; M-LoRA highest, median > 0.85",
                    f"mean inter-head cosine of B after {r03['steps']} steps: {ours}",
                    "reproduced" if rep else "not reproduced (ordering)"))
    else:
        out.append(missing("1. heads end up alike [03]"))

    # claim 2
    parts, verdict = [], []
    if r02:
        nr = r02["real_model"]["adapters"]["hydra-norouter"]
        parts.append(f"heads bit-identical after {r02['real_model']['steps']} steps (max abs B_i − B_j "
                     f"{nr['max_abs_head_difference']:.1f}) = one rank-r LoRA")
        verdict.append("mechanism exact")
    if r04 and "claim2_norouter_vs_hydra" in r04["verdict"]:
        v = r04["verdict"]["claim2_norouter_vs_hydra"]
        parts.append(f"accuracy w/o router − with: {diff(v)}")
        verdict.append(f"{v['verdict']} (accuracy)")
    out.append(("2. removing the router alone does not help [02, 04]", "73.58 vs 74.04",
                "; ".join(parts) or "not run", "; ".join(verdict) or "–"))

    # claim 3
    if r05:
        s, v, m = r05["summary"], r05["verdict"], r05["matched_rank"]
        key = f"lora-r{m} (matched)"
        eff = {k: sum(r["effective_rank"] for r in rs) / len(rs) for k, rs in r05["runs"].items()}
        low = s[f"lora-r{r05['rank']}"]["average"]
        ours = (f"LoRA r={m} (HydraLoRA's budget) {ms(s[key]['average'])} vs HydraLoRA {ms(s['hydra']['average'])}, "
                f"R-LoRA {ms(s['rlora']['average'])}, LoRA r={r05['rank']} {ms(low)}; "
                f"ΔW effective rank {eff[key]:.1f} vs {eff['hydra']:.1f} / {eff['rlora']:.1f}")
        out.append(("3. a LoRA at the same parameter budget matches multi-head [05]",
                    "LoRA† 42.21 vs R-LoRA 42.24 (LLaMA2-7B BBH); LoRA r=10 49.51 vs HydraLoRA 49.51 (Qwen2.5-7B)",
                    ours, f"{weak(v['matched_vs_hydra'])} (vs HydraLoRA); {weak(v['matched_vs_rlora'])} (vs R-LoRA)"))
    else:
        out.append(missing("3. capacity over architecture [05]"))

    # claims 4-6 and the mechanism
    if r06:
        s, v, rep = r06["summary"], r06["verdict"], r06["representation"]
        out.append(("4. KL alignment (A-LoRA-K) beats LoRA [06]", "80.06 vs 76.48 (+3.58, Qwen2.5-3B, 8 tasks)",
                    f"A-LoRA-K {ms(s['align-kl']['average'])} vs LoRA {ms(s['lora']['average'])}: "
                    f"{diff(v['claim4_kl_vs_lora'])}", v["claim4_kl_vs_lora"]["verdict"]))
        out.append(("5. MMD alignment does not match KL [06]", "A-LoRA-M 78.35 vs A-LoRA-K 80.06",
                    f"A-LoRA-M {ms(s['align-mmd']['average'])}; KL − MMD {diff(v['claim5_kl_vs_mmd'])}",
                    v["claim5_kl_vs_mmd"]["verdict"]))
        sweep = "; ".join(f"λ={lam}: {diff(x)}" for lam, x in v["claim6_sweep"].items())
        out.append(("6. A-LoRA-K ≥ LoRA over λ ∈ [0.01, 0.5] (paper's units) [06]",
                    "above LoRA at every λ, best near 0.1",
                    f"A-LoRA-K − LoRA, λ in our units (mean over pairs; paper's = ours/10): {sweep}",
                    "holds (none clearly below)" if v["claim6_none_clearly_below_lora"] else "does not hold"))
        m = v["mechanism_separation_kl_vs_lora"]
        out.append(("mechanism: alignment pulls task clusters of A-outputs together [06]",
                    "clusters closer, not collapsed (appendix I.1)",
                    f"held-out between/within task separation: fresh {ms(rep['fresh adapter']['sep_ratio'], 3)}, "
                    f"LoRA {ms(rep['lora']['sep_ratio'], 3)}, A-LoRA-K {ms(rep['align-kl']['sep_ratio'], 3)}; "
                    f"within-task spread {ms(rep['align-kl']['sep_within'], 3)} vs {ms(rep['lora']['sep_within'], 3)}",
                    m["verdict"]))
    else:
        out.append(missing("4-6. alignment [06]"))

    # claim 7
    if r07:
        a = r07["adapters"]
        merged = ", ".join(f"{k} {a[k]['merge_max_abs_logit_diff']:.0e}" for k in a if a[k]["mergeable"])
        refuse = ", ".join(k for k in a if not a[k]["mergeable"])
        step = ", ".join(f"{k} {r07['summary'][k]['step_vs_lora']:.2f}x" for k in a)
        out.append(("7. LoRA, Align-LoRA, M-LoRA, MultiLoRA merge exactly; routers do not [02, 07]",
                    "(derived, METHODS §7)", f"merged vs unmerged max abs logit diff: {merged}; refuse to merge: {refuse}; "
                                             f"train step vs LoRA: {step}", "reproduced (exact)"))
    else:
        out.append(missing("7. merge and cost [07]"))

    # claim 8
    if r08:
        s, v, c = r08["summary"], r08["verdict"], r08["head_cosine"]
        ours = (f"HydraLoRA {ms(s['hydra']['average'])}, +MT {ms(s['hydra+mt']['average'])}, +Init "
                f"{ms(s['hydra+init']['average'])}, both (R-LoRA) {ms(s['rlora']['average'])}; +MT − HydraLoRA "
                f"{diff(v['claim8_mt_vs_hydra'])}, +Init − HydraLoRA {diff(v['claim8_init_vs_hydra'])}, both − "
                f"HydraLoRA {diff(v['claim8_both_vs_hydra'])}; head cosine "
                + ", ".join(f"{k} {ms(c[k], 3)}" for k in c))
        out.append(("8. R-LoRA's multi-head dropout (+MT) and random init (+Init) each add points [08]",
                    "HydraLoRA 72.69, +MT 73.02, +Init 72.98, both 73.59 (Qwen2.5-0.5B, 5 tasks)", ours,
                    f"{v['claim8_mt_vs_hydra']['verdict']} (+MT); {v['claim8_init_vs_hydra']['verdict']} (+Init); "
                    f"{v['claim8_both_vs_hydra']['verdict']} (both)"))
    else:
        out.append(missing("8. R-LoRA's ingredients [08]"))

    # claim 9
    if r09:
        s, v, rep = r09["summary"], r09["verdict"], r09["representation"]
        ours = "; ".join(
            f"{name} {ms(s[k]['average'])} → +align {ms(s[k + '+align']['average'])} "
            f"({diff(v['claim9_' + k])}), task separation {ms(rep[k]['sep_ratio'], 3)} → "
            f"{ms(rep[k + '+align']['sep_ratio'], 3)}" for k, name in (("rlora", "R-LoRA"), ("mlora", "M-LoRA")))
        out.append(("9. alignment also helps R-LoRA / M-LoRA [09]", "improves both (appendix Table 9; values not "
                    "found)", ours, f"{v['claim9_rlora']['verdict']} (R-LoRA); {v['claim9_mlora']['verdict']} "
                    f"(M-LoRA); separation: {v['mechanism_separation_rlora']['verdict']} / "
                    f"{v['mechanism_separation_mlora']['verdict']}"))
    else:
        out.append(missing("9. alignment on multi-head adapters [09]"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    print("| claim (tutorial) | paper (METHODS §6) | ours (small scale) | verdict |")
    print("|---|---|---|---|")
    for row in rows(args.results):
        print("| " + " | ".join(row) + " |")
    meta = [load(args.results, n) for n in ("03_head_similarity", "04_simplified_multi_head", "05_capacity",
                                           "06_align", "08_rlora_ingredients", "09_align_any_architecture")]
    for m in meta:
        if m:
            print(f"\n{m['meta']['command']}: commit {m['meta']['commit']}, {m['meta']['date']}, "
                  f"{m['wall_s'] / 60:.1f} min, data {m['data']}")


if __name__ == "__main__":
    main()

"""The papers' numbers (METHODS.md §6) and settings (§5) put beside ours, keyed by experiments/claims.py's labels."""

# Align-LoRA Table 1 (METHODS §6.2): Qwen2.5-3B, five tasks, rank 4, 3 heads, gate/up/down; "Avg" as printed
TABLE1_COLUMNS = ("QNLI", "PIQA", "WinoGrande", "ARC", "GSM8K")
TABLE1 = {
    "hydra": {"QNLI": 81.91, "PIQA": 84.21, "WinoGrande": 70.92, "ARC": 87.21, "GSM8K": 45.95, "Avg": 74.04,
              "%Param": 0.45},
    "hydra-norouter": {"QNLI": 81.33, "PIQA": 83.51, "WinoGrande": 70.14, "ARC": 86.46, "GSM8K": 45.35,
                       "Avg": 73.58, "%Param": 0.41},
    "rlora": {"QNLI": 82.03, "PIQA": 85.55, "WinoGrande": 71.84, "ARC": 87.69, "GSM8K": 46.25, "Avg": 74.67,
              "%Param": 0.45},
    "mlora": {"QNLI": 82.52, "PIQA": 86.76, "WinoGrande": 72.95, "ARC": 88.15, "GSM8K": 46.85, "Avg": 75.45,
              "%Param": 0.41},
}
# our task names -> Table 1's column (the paper's ARC is easy and challenge together)
TABLE1_COLUMN_OF = {"qnli": "QNLI", "piqa": "PIQA", "winogrande": "WinoGrande", "arc-easy": "ARC",
                    "arc-challenge": "ARC", "gsm8k": "GSM8K"}

# Align-LoRA Table 5, Qwen2.5-3B, eight in-domain tasks, averages only (per-task cells are not in METHODS §6.2).
TABLE5_3B = {"lora-r8": 76.48, "hydra": 76.80, "rlora": 77.99, "mlora": 78.51, "a-lora-m": 78.35, "a-lora-k": 80.06}
# Align-LoRA Table 3, Qwen2.5-7B, Flan-v2 -> BBH; LoRA¹⁰ has HydraLoRA's budget (our `lora-budget`).
TABLE3_7B = {"lora-r8": 46.66, "lora-budget": 49.51, "hydra": 49.12, "rlora": 49.51, "mlora": 49.74}
# R-LoRA Table 4 (METHODS §6.1): Qwen2.5-0.5B, five unnamed tasks, the ingredients one at a time.
RLORA_TABLE4 = {"hydra-rs": 72.69, "hydra+mt": 73.02, "hydra+init": 72.98, "rlora": 73.59}
# Align-LoRA Figure 3 (METHODS §6.2, from reviews): A-LoRA-K between these at every λ in [0.01, 0.5], LoRA at 74.00.
FIGURE3 = {"a-lora-k": (75.10, 75.75), "lora": 74.00}
# claim 6's labels -> the paper's λ (a sum over task pairs; experiments/claims.py `lam` converts to ours)
SWEEP = {"a-lora-k-l0.01": 0.01, "a-lora-k-l0.05": 0.05, "a-lora-k": 0.1, "a-lora-k-l0.5": 0.5}
# METHODS §4.1: HydraLoRA's mean inter-head cosine per module type; M-LoRA's median over layers above ~0.85
HEAD_COSINE = {"hydra": {"gate_proj": 0.76, "up_proj": 0.78, "down_proj": 0.80}, "mlora_median_above": 0.85}

# the table each claim's paper numbers come from: {label: average}, and what it is
ANCHORS = {
    "1-2": ({k: v["Avg"] for k, v in TABLE1.items()}, "Align-LoRA Table 1, Qwen2.5-3B, 5 tasks"),
    "4-5": (TABLE5_3B, "Align-LoRA Table 5, Qwen2.5-3B, 8 tasks"),
    "3": (TABLE3_7B, "Align-LoRA Table 3, Qwen2.5-7B, Flan-v2 -> BBH"),
    "8": (RLORA_TABLE4, "R-LoRA Table 4, Qwen2.5-0.5B, 5 tasks"),
    "6": ({}, "Align-LoRA Figure 3 (A-LoRA-K 75.10-75.75 at every λ, LoRA 74.00)"),
    "9": ({}, "Align-LoRA appendix Table 9 (no numbers reachable)"),
    "10": ({}, "MeTA-LoRA abstract (arXiv 2510.11598; no numbers reachable, METHODS §2.9)"),
    "10-alpha": ({}, "MeTA-LoRA abstract (claim 10 at K = 16, at other inner learning rates; α not reachable)"),
}


def paper_diff(claim, a, b):
    """The paper's A − B in points for one of a claim's comparisons, or None where it gives no numbers."""
    table = ANCHORS[claim][0]
    return round(table[a] - table[b], 2) if a in table and b in table else None


# The paper's setting of each claim, for `--full` (METHODS §5)
_ALIGN = ("lr 2e-4, effective batch 50 (10 examples per task per step), one epoch over the per-task caps of METHODS "
          "§5.1 (qnli, piqa, arc 10k; winogrande 20k), seq_len 512, bf16, greedy decoding scored after the last "
          "'Answer:'")
SETTINGS = {
    "1-2": ("Qwen2.5-3B", ("qnli", "piqa", "winogrande", "arc-easy", "arc-challenge", "gsm8k"),
            "rank 4, 3 heads, gate/up/down, ARC easy + challenge as one task; " + _ALIGN),
    "3": ("Qwen2.5-7B", ("flan-v2 -> bbh",), "HydraLoRA/R-LoRA rank 4 x 3 heads vs LoRA at rank 10 (HydraLoRA's "
          "budget), gate/up/down, trained on Flan-v2, scored on BBH (3-shot); " + _ALIGN),
    "4-5": ("Qwen2.5-3B", ("qnli", "piqa", "winogrande", "arc-easy", "arc-challenge", "gsm8k", "boolq", "openbookqa",
                           "siqa"), "LoRA vs A-LoRA-K / A-LoRA-M at rank 8, λ 0.1 (summed over task pairs), "
            "gate/up/down, the 8-task suite of Table 5 (ARC easy + challenge count as one; its columns are unlabelled, "
            "METHODS §6.2 guesses these); " + _ALIGN),
    "6": ("Qwen2.5-3B", ("the Table 1 suite (setting of Figure 3 not stated)",), "A-LoRA-K rank 8 at λ 0.01, 0.05, "
          "0.1, 0.5 (summed over task pairs) vs LoRA rank 8; " + _ALIGN),
    "8": ("Qwen2.5-0.5B", ("5 unnamed tasks",), "R-LoRA's script: rank 4, 5 heads, lr 2e-4, gate/up/down; "
          "HydraLoRA, +multi-head dropout, +random init, both"),
    "9": ("Qwen2.5-3B", ("the Table 1 suite",), "R-LoRA / M-LoRA rank 4 x 3 heads with and without the KL "
          "alignment loss at λ 0.1 (appendix Table 9; its numbers were not reachable); " + _ALIGN),
}

# MeTA-LoRA (claim 10, METHODS §2.9): only the abstract was found, so tutorial 10's --full states this instead
META_SETTING = {
    "claim": "with only a few samples per task, MeTA-LoRA matches or beats ordinary multi-task LoRA trained on the "
             "full data, in multi-task and multilingual settings (abstract)",
    "known": "one plain LoRA trained MAML-style: n tasks per iteration, support/query split per task, k inner "
             "gradient steps on the support set, the query gradients aggregated into the shared LoRA",
    "not found": "the models, task suites, K, k, inner and outer learning rates, n, support/query sizes, first or "
                 "second order",
    "third party": "a reimplementation (not the authors') used n = 4 tasks, k = 10, inner lr 1e-4, outer lr 5e-5; "
                   "'about 100 samples per task' appears only in third-party notes",
}

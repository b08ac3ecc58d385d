"""Evaluation plumbing (nanoalign/evaluate.py, eval.py) on a tiny random Llama.

A random model answers at random, so these tests check the scorers against independent computations rather than
accuracy: option log-likelihoods against a direct sum of log-probs (ours and transformers'), batched left-padded
generation against one-prompt-at-a-time `generate` of transformers followed by `extract_answer`, merged against
unmerged adapters, and the error paths of eval.py.
"""

import errno
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import JSONL_TASKS, error_line, make_jsonl  # noqa: E402

import nanoalign  # noqa: E402
import nanoalign.plumbing
from nanoalign.plumbing import system  # noqa: E402
from nanoalign.adapters import apply_adapter  # noqa: E402
from nanoalign.plumbing.adapter_io import save_adapter  # noqa: E402
from nanoalign.data import extract_answer  # noqa: E402
from nanoalign.evaluate import (accuracies, choice_logprobs, diagnostics_table, encode_pair, evaluate,  # noqa: E402
                                generate_texts, markdown_table, summarise)
from nanoalign.plumbing import fast  # noqa: E402

from nanoalign.plumbing import eval_cli as eval_py  # noqa: E402  (eval.py's command line: `main`)

EXAMPLES = [  # hand-made: different prompt lengths (padding), options of different token lengths
    {"task": "t1", "prompt": "Task: colour the review.\nQuestion: blue or green? \"The meal was great.\"\nAnswer:",
     "answer": " blue", "options": [" blue", " green"]},
    {"task": "t1", "prompt": "Question: Which number is larger? A: 12 B: 97\nAnswer:", "answer": " B",
     "options": [" A", " B"]},
    {"task": "t2", "prompt": "Answer:", "answer": " yes", "options": [" yes", " no", " maybe not"]},
    {"task": "t2", "prompt": "Task: last letter.\nQuestion: What is the last letter of the word \"vadamu\"?\nAnswer:",
     "answer": " u", "options": [" a", " u", " zz top"]},
]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def model_tok(tiny):
    return nanoalign.plumbing.load_model(tiny), nanoalign.plumbing.load_tokenizer(tiny)


def direct_logprob(model, tok, prompt, option):
    """log p(option | prompt) from one unpadded forward with full logits: Σ_k log_softmax(logits[n_p - 1 + k])[o_k]."""
    p, o = tok.encode(prompt), tok.encode(option)
    with torch.no_grad():
        logp = model(torch.tensor([p + o])).float().log_softmax(-1)[0]
    return sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(o))


def test_choice_logprobs_equal_direct_sums(model_tok):
    """Batched, right-padded option scoring (logits only at option positions) equals the summed log-probs of one
    unpadded forward per (prompt, option) pair, to 1e-5."""
    model, tok = model_tok
    scores = choice_logprobs(model, tok, EXAMPLES, batch_size=3)[0]
    for ex, s in zip(EXAMPLES, scores):
        assert s == pytest.approx([direct_logprob(model, tok, ex["prompt"], o) for o in ex["options"]], abs=1e-5)


def test_choice_logprobs_match_transformers(tiny, model_tok):
    """The same scores from transformers' LlamaForCausalLM on the same checkpoint (independent model code)."""
    transformers = pytest.importorskip("transformers")
    model, tok = model_tok
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny).eval()
    ours = choice_logprobs(model, tok, EXAMPLES, batch_size=4)[0]
    for ex, s in zip(EXAMPLES, ours):
        ref = []
        for o in ex["options"]:
            p, a = tok.encode(ex["prompt"]), tok.encode(o)
            with torch.no_grad():
                logp = hf(torch.tensor([p + a])).logits.float().log_softmax(-1)[0]
            ref.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a)))
        assert s == pytest.approx(ref, abs=1e-4)


def test_loglik_accuracy_counts_the_argmax_option(model_tok):
    """evaluate(mode="loglik") marks an example correct iff its gold option has the highest direct log-prob: golds
    set to the argmax for examples 0 and 2 and to another option for 1 and 3 give exactly 50% per task."""
    model, tok = model_tok
    examples = []
    for i, ex in enumerate(EXAMPLES):
        s = [direct_logprob(model, tok, ex["prompt"], o) for o in ex["options"]]
        best = max(range(len(s)), key=s.__getitem__)
        examples.append({**ex, "answer": ex["options"][best if i % 2 == 0 else (best + 1) % len(s)]})
    acc = accuracies(evaluate(model, tok, {"t1": examples[:2], "t2": examples[2:]}, mode="loglik", batch_size=2))
    assert acc == {"t1": 0.5, "t2": 0.5}


def test_generation_equals_transformers_generate_and_extract_answer(tiny, model_tok):
    """Batched left-padded greedy generation with the KV cache (batch 3, prompts of different lengths) gives the same
    text as transformers' `generate` run on one prompt at a time, cut at eos; evaluate(mode="generate") is then
    the mean of extract_answer over those texts (golds chosen so that some are right and some wrong)."""
    transformers = pytest.importorskip("transformers")
    model, tok = model_tok
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny).eval()
    prompts = [ex["prompt"] for ex in EXAMPLES] + ["Question: Is this review blue or green?\nAnswer:"]
    ours = generate_texts(model, tok, prompts, batch_size=3, max_new_tokens=6)
    ref = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([tok.encode(p)]), max_new_tokens=6, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(tok.encode(p)):].tolist()
        ref.append(tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out))
    assert ours == ref
    golds = [(t.split("\n")[0].strip() or ".") if i % 2 == 0 else "qqqq" for i, t in enumerate(ref)]
    expected = [extract_answer(t, g) for t, g in zip(ref, golds)]
    assert any(expected) and not all(expected)
    examples = [{"task": "t", "prompt": p, "answer": " " + g} for p, g in zip(prompts, golds)]
    res = evaluate(model, tok, {"t": examples}, mode="generate", batch_size=3, max_new_tokens=6)
    assert res["t"]["accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert [r["correct"] for r in res["t"]["records"]] == expected and [r["text"] for r in res["t"]["records"]] == ref


def test_mtl_adapter_gets_its_task_ids(model_tok, tiny):
    """An MTL-LoRA adapter (per-task ΔW) is evaluated with each task's training id: the scores of one task differ
    between ids 0 and 1, and evaluating a task it was not trained on is a clear error."""
    _, tok = model_tok
    model = nanoalign.plumbing.load_model(tiny)
    apply_adapter(model, "mtl", rank=4, heads=2, num_tasks=2, targets=("q_proj", "v_proj", "up_proj"))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    s0 = choice_logprobs(model, tok, EXAMPLES[:2], task_id=0)[0]
    s1 = choice_logprobs(model, tok, EXAMPLES[:2], task_id=1)[0]
    assert max(abs(a - b) for x, y in zip(s0, s1) for a, b in zip(x, y)) > 1e-3
    acc = evaluate(model, tok, {"t1": EXAMPLES[:2]}, mode="loglik", task_ids={"t1": 1})
    assert set(acc) == {"t1"}
    with pytest.raises(ValueError, match="not trained on t2"):
        evaluate(model, tok, {"t2": EXAMPLES[2:]}, mode="loglik", task_ids={"t1": 0})


def test_markdown_table():
    """One row per task (sorted), percentages with one decimal, a dash for a missing task, unweighted averages."""
    table = markdown_table({"before": {"b": 0.5, "a": 0.25}, "after": {"a": 1.0}}, title="T")
    assert table == ("T\n\n| task | before | after |\n|---|---:|---:|\n| a | 25.0 | 100.0 |\n| b | 50.0 | – |\n"
                     "| **average** | **37.5** | **100.0** |")


def test_eval_py_with_adapter_merged_and_unmerged(tiny, model_tok, tmp_path, capsys):
    """eval.py --adapter-dir on a saved LoRA (random non-zero B): results.json and the printed table; the merged
    evaluation (default) gives the same per-task accuracy and the same option scores (1e-4) as the unmerged adapter
    model in memory."""
    _, tok = model_tok
    model = nanoalign.plumbing.load_model(tiny)
    model.name_or_path = str(tiny)
    apply_adapter(model, "lora", rank=4, alpha=8, targets=("q_proj", "v_proj", "gate_proj", "down_proj"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "run" / "adapter")
    data = make_jsonl(tmp_path / "test.jsonl", n=6, split="test")
    res = eval_py.main(["--adapter-dir", str(tmp_path / "run"), "--data", str(data), "--mode", "loglik",
                        "--batch-size", "4"])
    out = capsys.readouterr().out
    assert res["adapter"] == "lora (merged)" and res["model"] == str(tiny)
    assert "| **average** |" in out and f"| {JSONL_TASKS[0]}" in out and "majority" in out
    saved = json.loads((tmp_path / "run" / "eval" / "test-test-label-loglik-n500.json").read_text())
    assert saved["accuracy"] == res["accuracy"]
    from nanoalign.plumbing.datasets import load_tasks
    tasks = load_tasks(str(data), "test", max_per_task=500, seed=1337)
    assert accuracies(evaluate(model, tok, tasks, mode="loglik")) == res["accuracy"]
    merged = nanoalign.plumbing.load_model(tiny)
    from nanoalign.adapters import merge_adapters
    from nanoalign.plumbing.adapter_io import load_adapter
    merge_adapters(load_adapter(merged, tmp_path / "run" / "adapter"))
    a = choice_logprobs(model, tok, tasks[JSONL_TASKS[0]])[0]
    b = choice_logprobs(merged, tok, tasks[JSONL_TASKS[0]])[0]
    assert [x for r in a for x in r] == pytest.approx([x for r in b for x in r], abs=1e-4)
    unmerged = eval_py.main(["--adapter-dir", str(tmp_path / "run" / "adapter"), "--data", str(data), "--mode",
                             "loglik", "--no-merge", "--out", str(tmp_path / "r2.json")])
    assert unmerged["adapter"] == "lora" and unmerged["accuracy"] == res["accuracy"]


def test_eval_py_base_model_generate(tiny, tmp_path, capsys):
    """eval.py on the base model in generate mode writes results.json with one accuracy per task and the average."""
    data = make_jsonl(tmp_path / "test.jsonl", n=3, split="test")
    res = eval_py.main(["--model", str(tiny), "--data", str(data), "--max-new-tokens", "3",
                        "--out", str(tmp_path / "res.json")])
    assert (tmp_path / "res.predictions.jsonl").is_file()
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["accuracy"] == res["accuracy"] and sorted(saved["accuracy"]) == sorted(saved["examples"])
    assert saved["average"] == pytest.approx(sum(res["accuracy"].values()) / 3)
    assert "base" in capsys.readouterr().out


def test_eval_py_exports_peft_per_task(tiny, tmp_path, capsys):
    """--export-peft DIR: a saved MTL-LoRA becomes one PEFT LoRA per training task (DIR/<task>, holding ΔW_t of that
    task id, the same tensors as export_peft(task=t) in memory; a task name that is not a plain file name becomes
    task<id>, inside DIR), without evaluating; an existing DIR is not written into without --overwrite; a router
    (no PEFT form) and a missing --adapter-dir are one error line each."""
    from safetensors.torch import load_file
    from nanoalign.plumbing.adapter_io import export_peft
    model = nanoalign.plumbing.load_model(tiny)
    apply_adapter(model, "mtl", rank=2, heads=2, num_tasks=2, targets=("q_proj", "up_proj"))
    torch.manual_seed(0)
    with torch.no_grad():  # away from the init (B = 0, equal mixes), so the two tasks' ΔW_t differ
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "adapter" / "tasks.json").write_text(json.dumps({"tasks": ["task-a", "../../evil"]}))
    out = tmp_path / "exported"
    res = eval_py.main(["--adapter-dir", str(tmp_path / "run"), "--export-peft", str(out)])
    assert "one PEFT LoRA per task" in res["exported"] and "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["task-a", "task1"] and not (tmp_path / "evil").exists()
    assert not (tmp_path / "run" / "eval").exists()  # nothing evaluated
    for i, d in enumerate(["task-a", "task1"]):
        export_peft(model, tmp_path / "direct" / d, task=i)
        ours, direct = (load_file(root / d / "adapter_model.safetensors") for root in (out, tmp_path / "direct"))
        assert ours.keys() == direct.keys() and all(torch.equal(ours[k], direct[k]) for k in ours)
        assert json.loads((out / d / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    a, b = (load_file(out / d / "adapter_model.safetensors") for d in ("task-a", "task1"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert "exists and is not empty; pass --overwrite" in eval_error(
        capsys, ["--adapter-dir", tmp_path / "run", "--export-peft", out])
    eval_py.main(["--adapter-dir", str(tmp_path / "run"), "--export-peft", str(out), "--overwrite"])
    hydra = nanoalign.plumbing.load_model(tiny)
    apply_adapter(hydra, "hydra", rank=2, heads=2, targets=("q_proj",))
    save_adapter(hydra, tmp_path / "hydra" / "adapter")
    assert "no PEFT LoRA form" in eval_error(capsys, ["--adapter-dir", tmp_path / "hydra", "--export-peft",
                                                      tmp_path / "h"])
    assert "--export-peft needs --adapter-dir" in eval_error(capsys, ["--model", tiny, "--export-peft",
                                                                      tmp_path / "x"])


def eval_error(capsys, args):
    return error_line(capsys, eval_py.main, args)


@pytest.mark.parametrize("extra, message", [
    (["--adapter-dir", "/no/such/adapter"], "error: --adapter-dir /no/such/adapter: no such directory"),
    (["--adapter-dir", "PEFT"], "not a nanoalign adapter (a PEFT directory?"),
    (["--data", f"{JSONL_TASKS[0]},no-such-task"], "error: unknown task no-such-task"),
    (["--tasks", "no-such-task"], "error: --tasks no-such-task: not among the tasks"),
    (["--model", "no-such-model"], "error: unknown model 'no-such-model'"),
    (["--model", "/no/such/model"], "error: no such model directory"),
])
def test_eval_py_bad_inputs(tiny, tmp_path, capsys, extra, message):
    """Bad inputs end with exit code 1 and one `error: ...` line, no traceback."""
    data = make_jsonl(tmp_path / "test.jsonl", n=2, split="test")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    args = ["--model", str(tiny), "--data", str(data), "--out", str(tmp_path / "r.json")]
    assert message in eval_error(capsys, args + [str(tmp_path / "peft") if x == "PEFT" else x for x in extra])


# ----------------------------------------------------------------------------------------------------------------
# cloze scoring (lm-evaluation-harness convention), diagnostics, per-example records

CLOZE = [  # cloze-format examples: one context + option texts, a context with a trailing space, partial scoring
    {"task": "c1", "prompt": "Question: Which is blue?\nAnswer:", "answer": " the sky", "gold": 0,
     "options": [" the sky", " a lemon that is yellow"]},
    {"task": "c1", "prompt": "The number after 12 is ", "answer": "13", "gold": 0, "options": ["13", "fourteen"]},
    {"task": "c2", "prompt": "Ben saw a fox because Ben", "answer": " was near the river.", "gold": 0,
     "contexts": ["Ben saw a fox because Ben", "Ben saw a fox because the fox"]},
]


def harness_pair(tok, context, continuation):
    """lm-evaluation-harness's `_encode_pair`, written out independently: trailing context spaces move to the
    continuation; the continuation is whole[len(encode(context)):]."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation)
    return whole[:len(tok.encode(context))], whole[len(tok.encode(context)):]


SHARED = [  # choices that share tokens past the context, or none at all, for by_length's shared prefixes
    {"task": "c3", "prompt": "Question: How do you dry a shirt?\nAnswer:", "answer": " hang it on a line in the sun",
     "gold": 0, "options": [" hang it on a line in the sun", " hang it in the freezer"]},
    {"task": "c3", "prompt": "Question: How do you dry a shirt?\nAnswer:", "answer": " hang it", "gold": 0,
     "options": [" hang it", " hang", " hang it on a line"]},
    {"task": "c3", "prompt": "", "answer": " kept the fox.", "gold": 1,
     "contexts": ["Ben", "Anna said that the fox"]},  # no token shared: one forward per context
    {"task": "c3", "prompt": "", "answer": " because it was too big.", "gold": 0,
     "contexts": ["The trophy did not fit in the suitcase", "The trophy did not fit in the box"]},
] + [{"task": "c4", "prompt": f"Question: what comes after {i}?\nAnswer:", "answer": f" {i + 1}", "gold": 0,
      "options": [f" {i + 1}", f" {i + 1} or {i + 2}", f" {i} and then {i + 1}"]} for i in range(9)]


def test_shared_prefixes_are_the_longest_common_token_prefix(model_tok):
    """fast.shared_prefixes(share_prefix=True): one forward per example over the tokens all its choices share, past the context
    where the choices agree, each tail keeping at least one token; no shared token: one unit per context."""
    _, tok = model_tok
    units = fast.shared_prefixes(tok, SHARED[:4], 1024, joint=True, share_prefix=True)
    assert [e for e, _, _ in units] == [0, 1, 2, 2, 3]
    (_, prefix, tails), (_, prefix2, tails2) = units[0], units[1]
    assert tok.decode(prefix) == "Question: How do you dry a shirt?\nAnswer: hang it"
    assert [tok.decode(t) for _, t, _ in tails] == [" on a line in the sun", " in the freezer"]
    assert [n for *_, n in tails] == [len(tok.encode(o)) for o in SHARED[0]["options"]]  # the continuations
    assert min(len(t) for _, t, _ in tails2) == 1  # " hang" is a prefix of the others: its last token stays a tail
    assert len(prefix2) == len(tok.encode(SHARED[1]["prompt"] + " hang")) - 1
    assert [tok.decode(p) for _, p, _ in units[2:4]] == ["Ben", "Anna said that the fox"]
    assert tok.decode(units[4][1]) == "The trophy did not fit in the"


def test_padded_batches_bound_the_padding_share():
    """fast._padded_batches: runs of at most batch_size in the given (length) order; bounded, a run closes before
    an item that would make more than 10% of its padded positions padding, so a long tail runs alone."""
    lengths = [3, 3, 4, 4, 4, 5, 9, 40]
    plain = fast._padded_batches(list(range(8)), lengths, 3, bounded=False)
    assert plain == [[0, 1, 2], [3, 4, 5], [6, 7]]
    bounded = fast._padded_batches(list(range(8)), lengths, 3, bounded=True)
    assert [i for b in bounded for i in b] == list(range(8)) and max(map(len, bounded)) <= 3
    assert bounded[-2:] == [[6], [7]]
    for b in bounded:
        real, padded = sum(lengths[i] for i in b), len(b) * max(lengths[i] for i in b)
        assert len(b) == 1 or real >= 0.9 * padded


SCORERS = {"readable": choice_logprobs, "fast": fast.choice_logprobs,
           "fast, by_length": functools.partial(fast.choice_logprobs, by_length=True)}


@pytest.mark.parametrize("form", SCORERS)
def test_cloze_scores_match_transformers_with_harness_tokenisation(tiny, model_tok, form):
    """choice_logprobs(joint=True), batched and left-padded, equals transformers' LlamaForCausalLM run on each
    (context, continuation) pair alone, tokenised as the harness does, summed over the continuation tokens (1e-4);
    WinoGrande-style partial scoring scores the one continuation after each context. The same for the book's
    readable form and plumbing/fast.py's (contexts forwarded once into a KV cache; by_length: the longest shared
    prefix, tails batched by length)."""
    transformers = pytest.importorskip("transformers")
    model, tok = model_tok
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny).eval()
    examples = CLOZE + SHARED
    scores, lengths = SCORERS[form](model, tok, examples, batch_size=3, joint=True)
    pairs = [[(ex["prompt"], o) for o in ex["options"]] if "options" in ex else
             [(c, ex["answer"]) for c in ex["contexts"]] for ex in examples]
    for ex_pairs, s, n in zip(pairs, scores, lengths):
        ref, ref_n = [], []
        for context, continuation in ex_pairs:
            ctx, cont = harness_pair(tok, context, continuation)
            with torch.no_grad():
                logp = hf(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
            ref.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
            ref_n.append(len(cont))
        assert s == pytest.approx(ref, abs=1e-4) and n == ref_n
    assert encode_pair(tok, "is ", "13", joint=True)[1] == tok.encode(" 13")  # the space moved to the continuation


@pytest.mark.parametrize("form", SCORERS)
def test_cloze_batches_equal_single_rows(model_tok, form):
    """Left-padded batches of mixed examples give the same scores as one row per forward (relative 1e-6)."""
    model, tok = model_tok
    batched = SCORERS[form](model, tok, CLOZE + EXAMPLES, batch_size=16, joint=True)[0]
    single = SCORERS[form](model, tok, CLOZE + EXAMPLES, batch_size=1, joint=True)[0]
    assert [x for r in batched for x in r] == pytest.approx([x for r in single for x in r], rel=1e-6)


def test_evaluate_scores_with_the_models_whole_window(model_tok):
    """A context longer than 1024 tokens (choice_logprobs' default cut) is scored over the model's whole context
    window, as lm-eval's HF backend does; the tiny model's window is 256, so a ~600-token context is cut there."""
    model, tok = model_tok
    window = model.config.max_position_embeddings
    long = {"task": "c", "prompt": "the fox and the dog " * 60 + "\nAnswer:", "answer": " yes", "gold": 0,
            "options": [" yes", " no"]}
    assert window < len(tok.encode(long["prompt"])) < 1024
    got = evaluate(model, tok, {"c": [long]}, mode="cloze")["c"]["records"][0]["scores"]
    assert got == pytest.approx(choice_logprobs(model, tok, [long], max_len=window, joint=True)[0][0], rel=1e-6)
    assert got != pytest.approx(choice_logprobs(model, tok, [long], joint=True)[0][0], rel=1e-6)


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_fast_scorer_equals_the_readable_one(model_tok, batch_size, joint):
    """plumbing/fast.py's choice_logprobs, plain (the grids' and train.py's) and by_length (eval.py's: the longest
    shared token prefix, tails grouped by length over several batches), gives the book's readable scores (relative
    1e-6) and token counts, on contexts shared by several choices, one-token ones, choices sharing tokens past the
    context, different contexts with and without shared tokens, a context cut to the window, and (batch_size 1)
    more units than one group of batches holds."""
    model, tok = model_tok
    long = {"task": "c", "prompt": "the fox and the dog " * 60 + "\nAnswer:", "answer": " yes", "gold": 0,
            "options": [" yes", " no way", " no"]}
    examples = CLOZE + EXAMPLES + SHARED + [long]
    window = model.config.max_position_embeddings
    readable = choice_logprobs(model, tok, examples, batch_size=batch_size, joint=joint, max_len=window)
    for form in ("fast", "fast, by_length"):
        got = SCORERS[form](model, tok, examples, batch_size=batch_size, joint=joint, max_len=window)
        assert got[1] == readable[1]
        assert [x for r in got[0] for x in r] == pytest.approx([x for r in readable[0] for x in r], rel=1e-6)


def test_cloze_acc_and_acc_norm_follow_the_harness(model_tok):
    """evaluate(mode="cloze"): acc = argmax of the summed log-probs, acc_norm = argmax of the sums divided by the
    choice's characters (the option text without the joining space; the contexts for partial scoring)."""
    model, tok = model_tok
    scores, _ = choice_logprobs(model, tok, CLOZE, joint=True)
    res = evaluate(model, tok, {"c1": CLOZE[:2], "c2": CLOZE[2:]}, mode="cloze")
    records = res["c1"]["records"] + res["c2"]["records"]
    for ex, s, r in zip(CLOZE, scores, records):
        chars = [len(o) - o.startswith(" ") for o in ex["options"]] if "options" in ex else \
            [len(c) for c in ex["contexts"]]
        best = max(range(len(s)), key=s.__getitem__)
        best_norm = max(range(len(s)), key=lambda i: s[i] / chars[i])
        assert r["correct"] == (best == ex["gold"]) and r["correct_norm"] == (best_norm == ex["gold"])
        assert r["scores"] == pytest.approx(s, rel=1e-5)
    assert res["c1"]["acc_norm"] == sum(r["correct_norm"] for r in res["c1"]["records"]) / 2
    assert res["c1"]["mode"] == "cloze" and [r["index"] for r in records] == [None] * 3


def test_summarise_histograms_majority_and_collapse():
    """Per task: accuracy, binomial SE sqrt(p(1-p)/n), majority-class rate of the gold labels, predicted-label
    histogram; 'collapsed' only when one prediction covers MORE than 90% of the examples."""
    gold = ["pos"] * 6 + ["neg"] * 4
    nine = [{"gold": g, "pred": "pos" if i < 9 else "neg", "correct": g == ("pos" if i < 9 else "neg")}
            for i, g in enumerate(gold)]
    s = summarise(nine)
    assert s["accuracy"] == 0.7 and s["se"] == pytest.approx((0.7 * 0.3 / 10) ** 0.5)
    assert s["majority_rate"] == 0.6 and s["majority_label"] == "pos" and s["predicted"] == {"pos": 9, "neg": 1}
    assert s["top_share"] == 0.9 and not s["collapsed"]
    every = summarise([{"gold": g, "pred": "pos", "correct": g == "pos"} for g in gold])
    assert every["collapsed"] and every["accuracy"] == every["majority_rate"] == 0.6
    table = diagnostics_table({"t": every, "u": s})
    assert "| t **collapsed** | 10 | 60.0 ± 15.5 | 60.0 | pos 100% |" in table and "collapsed (t)" in table
    assert markdown_table({"run": {"t": every}}).count("(c)") == 2  # the cell and the footnote


def test_label_histogram_uses_option_words_or_positions(model_tok):
    """The histogram names predictions by their option text when every example has the same options (label
    format), by position when options differ (cloze); generate mode names the option the answer matched."""
    model, tok = model_tok
    same = [{**EXAMPLES[0], "index": 0}, {**EXAMPLES[0], "answer": " green", "index": 1}]
    res = evaluate(model, tok, {"t": same}, mode="loglik")["t"]
    assert set(res["predicted"]) <= {"blue", "green"} and res["gold"] == {"blue": 1, "green": 1}
    assert res["majority_rate"] == 0.5 and [r["index"] for r in res["records"]] == [0, 1]
    res = evaluate(model, tok, {"c1": CLOZE[:2]}, mode="cloze")["c1"]
    assert set(res["predicted"]) <= {"1", "2"} and res["gold"] == {"1": 2}


def test_eval_py_diagnostics_predictions_and_no_silent_overwrite(tiny, tmp_path, capsys, monkeypatch):
    """eval.py without --out writes under out/eval/<model>/ (not the working directory), with the per-task
    diagnostics and one record per example (index = position in the file with --max-per-task 0); running the same
    evaluation again is an error until --overwrite."""
    monkeypatch.chdir(tmp_path)
    data = make_jsonl(tmp_path / "test.jsonl", n=4, split="test")
    args = ["--model", str(tiny), "--data", str(data), "--mode", "loglik", "--max-per-task", "0"]
    res = eval_py.main(args)
    out = tmp_path / "out" / "eval" / tiny.name / "test-test-label-loglik-nall.json"
    saved = json.loads(out.read_text())
    assert saved["accuracy"] == res["accuracy"] and not list(tmp_path.glob("*.json"))
    diag = saved["tasks"][JSONL_TASKS[0]]
    assert {"n", "se", "majority_rate", "predicted", "collapsed"} <= set(diag) and diag["n"] == 4
    records = [json.loads(line) for line in out.with_name(out.stem + ".predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and [r["index"] for r in records[:4]] == [0, 1, 2, 3]
    assert {"task", "index", "gold", "pred", "scores"} <= set(records[0])
    assert "majority (%)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_py.main(args)
    assert "exists (an earlier evaluation); pass --overwrite" in capsys.readouterr().err
    assert eval_py.main(args + ["--overwrite"])["accuracy"] == res["accuracy"]


# ----------------------------------------------------------------------------------------------------------------
# eval.py: damaged files and system errors are one line; what was asked but not done is said

@pytest.mark.parametrize("damage, message", [
    ("config-not-json", "adapter_config.json:1: not valid JSON"),
    ("config-missing-key", "adapter_config.json: incomplete adapter config, missing rank"),
    ("config-not-object", "adapter_config.json: expected a JSON object, got list"),
    ("safetensors-cut", "adapter.safetensors: corrupt or truncated safetensors file"),
    ("tasks-not-json", "tasks.json:1: not valid JSON"),
])
def test_eval_py_damaged_adapter_is_one_line(tiny, tmp_path, capsys, damage, message):
    """A damaged adapter directory (adapter_config.json not JSON, not an object or without a key; a truncated
    adapter.safetensors; tasks.json not JSON) ends with one error line naming the file, no traceback."""
    model = nanoalign.plumbing.load_model(tiny)
    apply_adapter(model, "lora", rank=2, targets=("q_proj",))
    d = tmp_path / "adapter"
    save_adapter(model, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if damage == "config-not-json":
        (d / "adapter_config.json").write_text("{not json")
    elif damage == "config-missing-key":
        (d / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "rank"}))
    elif damage == "config-not-object":
        (d / "adapter_config.json").write_text("[1, 2]")
    elif damage == "safetensors-cut":
        (d / "adapter.safetensors").write_bytes((d / "adapter.safetensors").read_bytes()[:60])
    else:
        (d / "tasks.json").write_text('{"tasks": [')
    data = make_jsonl(tmp_path / "test.jsonl", n=2, split="test")
    error = eval_error(capsys, ["--model", tiny, "--adapter-dir", d, "--data", data, "--out", tmp_path / "r.json"])
    assert error.startswith(f"error: {d}") and message in error, error


def test_eval_py_system_errors_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    """--device tpu, --device cuda without CUDA, a data file that is not UTF-8 (file and line named), a read-only
    --out (mkdir made to fail with EROFS) and a full disk while the results are written (ENOSPC): one error line
    each, naming what is wrong and what to do."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_jsonl(tmp_path / "test.jsonl", n=2, split="test")
    args = ["--model", tiny, "--data", data, "--max-new-tokens", 2]
    assert "--device tpu: not a device nanoalign runs on" in eval_error(capsys, args + ["--device", "tpu"])
    assert "--device cuda: CUDA is not available here" in eval_error(capsys, args + ["--device", "cuda"])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(data.read_bytes().split(b"\n")[0] + b"\n" + '{"task": "t", "prompt": "caf\u00e9"}\n'.encode(
        "latin-1"))
    assert f"{latin1}:2: not UTF-8 text" in eval_error(capsys, ["--model", tiny, "--data", latin1])
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    def full(file, *a, **k):  # the disk fills up when write_atomic opens its temporary file
        if Path(file).name.startswith(".full"):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return open(file, *a, **k)
    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setattr(system, "open", full, raising=False)  # module globals come before builtins
    error = eval_error(capsys, args + ["--out", tmp_path / "ro" / "r.json"])
    assert error == f"error: {tmp_path / 'ro'}: read-only file system; choose another --out"
    error = eval_error(capsys, args + ["--out", tmp_path / "full.json"])
    assert error.startswith(f"error: {tmp_path}/.full") and "the disk is full; free space and run again" in error
    assert not list(tmp_path.glob(".full*"))


def test_eval_py_loglik_names_the_tasks_it_generates_for(tiny, tmp_path, capsys):
    """--mode loglik on data where one task has no options: one note on stderr names that task, and its result
    records mode 'generate' while the others say 'loglik'."""
    rows = [json.loads(line) for line in make_jsonl(tmp_path / "t.jsonl", n=2, split="test").read_text().splitlines()]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "options" or r["task"] != JSONL_TASKS[0]})
                            + "\n" for r in rows))
    res = eval_py.main(["--model", str(tiny), "--data", str(data), "--mode", "loglik", "--max-new-tokens", "2",
                        "--out", str(tmp_path / "r.json")])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: --mode loglik scores options; {JSONL_TASKS[0]} (no options) will be scored by "
                     "generation instead (its result says mode 'generate')"]
    assert {t: r["mode"] for t, r in res["tasks"].items()} == {JSONL_TASKS[0]: "generate", JSONL_TASKS[1]: "loglik",
                                                               JSONL_TASKS[2]: "loglik"}

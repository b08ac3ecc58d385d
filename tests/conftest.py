"""Shared fixtures: a tiny random Llama + byte-level BPE tokenizer directory, built once per module."""

import json
from pathlib import Path

import pytest
import torch

from nanoalign.plumbing.datasets import write_jsonl
from nanoalign.plumbing.tasks import BUILTIN_TASKS, builtin_examples

JSONL_TASKS = tuple(sorted(BUILTIN_TASKS)[:3])  # the small JSONL data set most tests train on

def make_tiny_model(d: Path, vocab_size=400) -> Path:
    """tokenizer.json + tokenizer_config.json (eos/pad) + a random LlamaForCausalLM saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [ex["prompt"] + ex["answer"] for t in BUILTIN_TASKS for ex in builtin_examples(t, "train", n=200)]
    tk.train_from_iterator(corpus, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    eos, pad = tk.token_to_id("<|endoftext|>"), tk.token_to_id("<pad>")
    cfg = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=eos,
                                   eos_token_id=eos, pad_token_id=pad,
                                   initializer_range=0.3)  # HF's 0.02 caps the logits near uniform: nothing to learn
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def make_jsonl(path: Path, tasks=JSONL_TASKS, n=32, split="train"):
    rows = [ex for t in tasks for ex in builtin_examples(t, split, n=n)]
    write_jsonl(path, rows)
    return path


def error_line(capsys, main, args):
    """Run a script's `main(args)`, expect exit code 1, and return its single `error: ...` line on stderr (no
    traceback): how train.py and eval.py must end on a bad input."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine a spinning OpenMP thread stalls every op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))



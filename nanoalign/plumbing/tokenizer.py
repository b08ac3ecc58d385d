r"""Tokenizer on the `tokenizers` library, with hand-written chat templates (no jinja).

Reads tokenizer.json, tokenizer_config.json (special tokens, the jinja `chat_template`) and the token ids of
generation_config.json / config.json, and renders the two chat formats by hand:

    ChatML (Qwen2, Qwen2.5, SmolLM2)          Llama-3.1+ (3.0 has no system turn unless given, and no dates)
    <|im_start|>system\n{sys}<|im_end|>\n      <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n
    <|im_start|>user\n{msg}<|im_end|>\n        Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n
    <|im_start|>assistant\n                    {sys}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n
                                              {msg}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n

The family and its details (ChatML's default system prompt, Llama's date) are read from the jinja template's text;
tests/test_tokenizer.py checks the output equals transformers' jinja rendering.
"""

import re
import time
from functools import cached_property
from pathlib import Path

from .system import read_json

# A ChatML template's built-in system prompt ("\n" escaped in tokenizer_config.json, a real newline in a GGUF)
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^<>{}'\"]+?)<\|im_end\|>")
_LLAMA_DEFAULT_DATE = re.compile(r"date_string\s*=\s*[\"']([^\"']+)[\"']")


class Tokenizer:
    """Encode/decode text and render chat prompts for one checkpoint."""

    def __init__(self, tk, config: dict | None = None, gen_config: dict | None = None,
                 model_config: dict | None = None):
        self.tk = tk
        self.config = config or {}
        self.chat_template = self.config.get("chat_template") or ""
        if isinstance(self.chat_template, list):  # some repos store several named templates
            named = {t.get("name"): t.get("template", "") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), "")
        ids = lambda key: self._id(self.config.get(key), key, gen_config or {}, model_config or {})  # noqa: E731
        self.bos_id, self.eos_id, pad = ids("bos_token"), ids("eos_token"), ids("pad_token")
        self.pad_id = pad if pad is not None else self.eos_id  # no pad token (Llama-3): pad with eos, masked anyway
        if self.eos_id is None:
            raise ValueError("no eos token: tokenizer_config.json, generation_config.json and config.json name none")
        # every id generation should stop at (Llama-3.1 lists <|eot_id|>, <|eom_id|>, <|end_of_text|>)
        stops = (gen_config or {}).get("eos_token_id", (model_config or {}).get("eos_token_id"))
        stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
        if not all(map(self._is_id, stops)):
            raise ValueError(f"eos_token_id {stops!r} in generation_config.json or config.json is not a list of token "
                             "ids of tokenizer.json; download the model files again")
        self.stop_ids = sorted({self.eos_id, *stops})
        self.bos_token = self.tk.id_to_token(self.bos_id) if self.bos_id is not None else None
        # whether the checkpoint's own tokenizer prepends BOS to plain text (Llama-3 does, Qwen/SmolLM2 do not)
        self.add_bos = self.bos_id is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)  # may be < the model's embedding rows

    def _is_id(self, i):
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.tk.get_vocab_size(True)

    def _id(self, token, key, gen_config, model_config):
        """A special token's id: its text in tokenizer_config.json, else `<key>_id` in generation_config/config; a
        bos/pad key present but null means none (Qwen's `bos_token: null`, whatever generation_config says)."""
        text = token.get("content") if isinstance(token, dict) else token  # "<s>" or {"content": "<s>", ...}
        if text is None and key in self.config and key != "eos_token":
            return None
        if text is not None and not isinstance(text, str):
            raise ValueError(f"tokenizer_config.json: {key} is {text!r}, expected a token's text (a string or "
                             "{\"content\": string}); download the tokenizer files again")
        if text is not None:
            i = self.tk.token_to_id(text)
            if i is None:
                raise ValueError(f"tokenizer_config.json names {key} {text!r}, which is not in tokenizer.json")
            return i
        for cfg in (gen_config, model_config):
            i = cfg.get(key + "_id")
            if isinstance(i, list):
                i = i[0] if i else None
            if i is not None:
                if not self._is_id(i):
                    raise ValueError(f"{key}_id {i!r} in generation_config.json or config.json is not a token id of "
                                     "tokenizer.json; download the model files again")
                return int(i)
        return None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json; nanoalign needs the fast-tokenizer file that "
                                    "Hugging Face checkpoints ship next to config.json")
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{file}: unreadable tokenizer.json ({e}); download it again") from None

        def read(name):  # a JSON object, {} for a missing file, or a ValueError naming the file (broken, a list, ...)
            return read_json(path / name, "download the tokenizer files again") if (path / name).is_file() else {}
        return cls(tk, read("tokenizer_config.json"), read("generation_config.json"), read("config.json"))

    def encode(self, text: str) -> list[int]:
        """Token ids, no BOS/EOS added. Special tokens written in the text (e.g. "<|im_start|>") stay whole."""
        return self.tk.encode(text, add_special_tokens=False).ids

    @cached_property
    def max_token_chars(self) -> int:
        """The longest token's length in characters: data.text_tail's bound on what it tokenises."""
        return max(map(len, self.tk.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self):
        return self.vocab_size

    @property
    def template_family(self) -> str:
        if "<|im_start|>" in self.chat_template:
            return "chatml"
        if "<|start_header_id|>" in self.chat_template:
            return "llama3"
        return "plain"

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, date_string: str | None = None) -> str:
        """Render [{"role": ..., "content": ...}, ...] as the model's chat prompt text. `date_string` (Llama-3.1+):
        default is the template's rule (today if it calls strftime_now, else its fixed date)."""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {m!r} must be a dict with string 'role' and 'content'")
        family = self.template_family
        if family == "chatml":
            return self._chatml(messages, add_generation_prompt)
        if family == "llama3":
            return self._llama3(messages, add_generation_prompt, date_string)
        return self._plain(messages, add_generation_prompt)

    def _chatml(self, messages, add_generation_prompt):
        # Qwen2/2.5 and SmolLM2 insert a default system turn when the conversation has none.
        default = _CHATML_DEFAULT_SYSTEM.search(self.chat_template)
        if default and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": default.group(1)}] + list(messages)
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def _llama3(self, messages, add_generation_prompt, date_string):
        bos = self.bos_token or "<|begin_of_text|>"
        turn = lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"  # noqa: E731
        if "Cutting Knowledge" in self.chat_template:
            # 3.1+: the system turn always exists and starts with the knowledge cutoff and today's date
            system = ""
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"].strip(), messages[1:]
            if date_string is None:
                fixed = _LLAMA_DEFAULT_DATE.search(self.chat_template)
                use_today = "strftime_now" in self.chat_template or fixed is None
                date_string = time.strftime("%d %b %Y") if use_today else fixed.group(1)
            out = bos + turn("system", f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}")
        else:  # 3.0: every message as-is, bos before the first
            out = bos
        out += "".join(turn(m["role"], m["content"].strip()) for m in messages)
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")

    def _plain(self, messages, add_generation_prompt):
        # No chat template (a base model): a readable "role: content" transcript.
        out = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return out + ("assistant: " if add_generation_prompt else "")

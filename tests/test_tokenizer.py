"""nanoalign.plumbing.tokenizer: hand-written chat templates against transformers' jinja rendering, special-token ids.

Each test builds a tiny byte-level tokenizer directory in tmp_path with a real model's jinja `chat_template` in
tokenizer_config.json (Qwen2.5, Qwen2, SmolLM2, Llama-3.0/3.1/3.2, written out below) and checks that our
`apply_chat_template` renders exactly what `transformers` renders from the same directory.
"""

import json

import pytest

from nanoalign.plumbing.tokenizer import Tokenizer

# Qwen2.5-*-Instruct tokenizer_config.json "chat_template" (tools branch included: transformers runs all of it).
QWEN25 = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"  # noqa: E501

# Qwen2-*-Instruct: the older ChatML template with a shorter default system prompt.
QWEN2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"  # noqa: E501

# SmolLM2-135M-Instruct, as stored in the GGUF's tokenizer.chat_template (real newlines inside the jinja strings).
SMOLLM2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501

# Llama-3.2-*-Instruct tokenizer_config.json "chat_template".
LLAMA32 = "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n        {{- tool_call.arguments | tojson }}\n        {{- \"}\" }}\n        {{- \"<|eot_id|>\" }}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"  # noqa: E501

# Llama-3.1: the same template with a fixed date instead of strftime_now.
LLAMA31 = LLAMA32.replace(
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}",  # noqa: E501
    "{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}")

# Llama-3.0-*-Instruct.
LLAMA30 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": "Héllo, 世界 🤗"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! \n"},
     {"role": "user", "content": "Sentiment of 'great film'?\nAnswer:"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def make_dir(path, specials, post_bos=None, **config):
    """A byte-level BPE with no merges (one token per byte) plus `specials`, and a tokenizer_config.json.
    `post_bos`: a special token the tokenizer prepends itself, as Llama-3's tokenizer.json does."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if post_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{post_bos} $A", pair=f"{post_bos} $A $B",
                                                          special_tokens=[(post_bos, tk.token_to_id(post_bos))])
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return path


def reference(path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


CHATML_CASES = {"qwen2.5": QWEN25, "qwen2": QWEN2, "smollm2": SMOLLM2}


@pytest.mark.parametrize("name", CHATML_CASES)
def test_chatml_matches_transformers(tmp_path, name):
    """ChatML (Qwen2.5 with its 'You are Qwen...' default, Qwen2, SmolLM2): text and ids equal transformers'."""
    d = make_dir(tmp_path, CHATML_SPECIALS, chat_template=CHATML_CASES[name], eos_token="<|im_end|>",
                 pad_token="<|endoftext|>")
    ours, ref = Tokenizer.from_dir(d), reference(d)
    assert ours.template_family == "chatml"
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    default = {"qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
               "qwen2": "You are a helpful assistant.",
               "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}[name]
    assert ours.apply_chat_template(CONVERSATIONS[0]).startswith(f"<|im_start|>system\n{default}<|im_end|>\n")


@pytest.mark.parametrize("template", [LLAMA32, LLAMA31, LLAMA30], ids=["3.2", "3.1", "3.0"])
def test_llama3_matches_transformers(tmp_path, template):
    """Llama-3 (3.0; 3.1 with its fixed date; 3.2 with today's date or an explicit one): equal to transformers'."""
    d = make_dir(tmp_path, LLAMA_SPECIALS, chat_template=template, bos_token="<|begin_of_text|>",
                 eos_token="<|eot_id|>")
    ours, ref = Tokenizer.from_dir(d), reference(d)
    assert ours.template_family == "llama3"
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
            assert text.startswith("<|begin_of_text|><|start_header_id|>")
    if template is not LLAMA30:
        explicit = ours.apply_chat_template(CONVERSATIONS[1], date_string="01 Jan 2025")
        assert explicit == ref.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True,
                                                   date_string="01 Jan 2025")
        assert "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\nBe terse.<|eot_id|>" in explicit


def test_special_tokens_stay_whole_and_decode_roundtrips(tmp_path):
    """encode() keeps control tokens whole (one id each) and adds no BOS; decode() drops them unless asked."""
    d = make_dir(tmp_path, CHATML_SPECIALS, chat_template=SMOLLM2, eos_token="<|im_end|>")
    tok = Tokenizer.from_dir(d)
    text = "<|im_start|>user\nnaïve café ☕<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == tok.tk.token_to_id("<|im_start|>") and tok.eos_id in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nnaïve café ☕\n"
    assert tok.encode("hi") == [tok.tk.token_to_id("h"), tok.tk.token_to_id("i")]  # no BOS prepended
    assert tok.vocab_size == 256 + len(CHATML_SPECIALS) == len(tok)


def test_eos_pad_bos_resolution(tmp_path):
    """eos/pad/bos come from tokenizer_config.json (strings or {"content": ...} dicts), pad falls back to eos,
    and generation_config.json then config.json supply ids the tokenizer config does not name."""
    d = make_dir(tmp_path / "a", LLAMA_SPECIALS, post_bos="<|begin_of_text|>", chat_template=LLAMA32,
                 bos_token={"content": "<|begin_of_text|>", "special": True}, eos_token={"content": "<|eot_id|>"})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_id == tok.tk.token_to_id("<|eot_id|>") and tok.pad_id == tok.eos_id
    assert tok.bos_id == tok.tk.token_to_id("<|begin_of_text|>") and tok.add_bos
    assert tok.encode("a") == [tok.tk.token_to_id("a")]  # encode() itself never adds it

    d = make_dir(tmp_path / "b", CHATML_SPECIALS)  # no special tokens named anywhere in tokenizer_config.json
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 256]}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 258, "pad_token_id": 256}))
    tok = Tokenizer.from_dir(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (257, 256, None)  # generation_config first, config.json next
    assert tok.stop_ids == [256, 257]

    d = make_dir(tmp_path / "c", CHATML_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok = Tokenizer.from_dir(d)
    assert (tok.eos_id, tok.pad_id, tok.add_bos) == (258, 256, False)

    # Qwen2.5: `bos_token: null` in tokenizer_config.json wins over generation_config.json's bos_token_id
    d = make_dir(tmp_path / "d", CHATML_SPECIALS, bos_token=None, eos_token="<|im_end|>")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": [258, 256]}))
    tok = Tokenizer.from_dir(d)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (None, 258, [256, 258])
    assert tok.template_family == "plain"
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "user: What is 2+2?\nassistant: "


def test_errors(tmp_path):
    """A missing tokenizer.json, an unknown special token, no eos at all, a malformed message: clear errors."""
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = make_dir(tmp_path / "a", CHATML_SPECIALS, eos_token="</s>")
    with pytest.raises(ValueError, match="not in tokenizer.json"):
        Tokenizer.from_dir(d)
    d = make_dir(tmp_path / "b", CHATML_SPECIALS)
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer.from_dir(d)
    d = make_dir(tmp_path / "c", CHATML_SPECIALS, eos_token="<|im_end|>", chat_template=QWEN25)
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user"}])

"""Prompt formats: render an example to text plus the character spans the loss trains on.

Built-in formats, each byte-identical to the Jinja template next to it (tests compare with
`transformers`' `apply_chat_template`), so a checkpoint can ship the same template for serving:

- `alpaca`  instruct data only: `[bos] + alpaca prompt + output + [eos]` (the Stanford alpaca prompt).
- `llama2`  `<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>` (Meta's Llama-2-chat template).
- `llama3`  `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>` (Meta's Llama-3-Instruct template).
- `chatml`  `<|im_start|>role\\ncontent<|im_end|>\\n` (ChatML, as Qwen and others use it).

Any other chat template (the tokenizer's own, or a Jinja string passed as `chat_template`) is rendered with
`transformers`' Jinja renderer, and the assistant spans are found by rendering prefixes of the conversation:
assistant turn i trains on `render(messages[:i+1])` minus `render(messages[:i], add_generation_prompt=True)`, with
trailing whitespace left out. Every assistant turn is trained, not only the last. The built-in renderers use the same
span rule, so both paths mask the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mytune.data.formats import Example, RowError
from mytune.errors import ConfigError

BUILTIN_TEMPLATES = ("alpaca", "llama2", "llama3", "chatml")
TOKENIZER_TEMPLATE = "tokenizer"

# The Stanford alpaca templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Jinja equivalents of the built-in chat formats (what `apply_chat_template` renders identically).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
JINJA_OF_BUILTIN = {"llama2": LLAMA2_JINJA, "llama3": LLAMA3_JINJA, "chatml": CHATML_JINJA}


@dataclass
class Rendered:
    """Text of one sample and the half-open character spans that are targets.

    `add_bos`/`add_eos`: put the tokenizer's bos id before / eos id after the text's tokens (alpaca and text formats;
    chat templates write their own special tokens into the text). The added eos is a target, the bos is not.
    `special_text`: the text holds special-token strings the template wrote (split them out to their ids); False for
    alpaca and text rows, whose text is the user's own and goes to `encode` unchanged.
    """

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    add_bos: bool = False
    add_eos: bool = False
    special_text: bool = True


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca prompt for one row: the with-input template when `input_text` is non-empty, else the no-input one."""
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def render_llama3(messages: Sequence[dict], *, bos_token: str, add_generation_prompt: bool = False) -> Rendered:
    parts, spans = [bos_token], []
    for message in messages:
        header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        parts.append(header)
        start = sum(map(len, parts))
        parts.append(message["content"].strip() + "<|eot_id|>")
        if message["role"] == "assistant":
            spans.append((start, sum(map(len, parts))))
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return Rendered("".join(parts), spans)


def render_chatml(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> Rendered:
    parts, spans, length = [], [], 0
    for message in messages:
        header = f"<|im_start|>{message['role']}\n"
        body = message["content"] + "<|im_end|>"
        if message["role"] == "assistant":
            spans.append((length + len(header), length + len(header) + len(body)))
        parts.append(header + body + "\n")
        length += len(parts[-1])
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return Rendered("".join(parts), spans)


def render_llama2(messages: Sequence[dict], *, bos_token: str, eos_token: str) -> Rendered:
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts, spans, length = [], [], 0
    for index, message in enumerate(messages):
        if (message["role"] == "user") != (index % 2 == 0) or message["role"] not in ("user", "assistant"):
            raise RowError("Conversation roles must alternate user/assistant/user/assistant/...")
        content = message["content"]
        if index == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if message["role"] == "user":
            piece = f"{bos_token}[INST] {content.strip()} [/INST]"
        else:
            piece = f" {content.strip()} {eos_token}"
            spans.append((length, length + len(piece.rstrip())))
        parts.append(piece)
        length += len(piece)
    return Rendered("".join(parts), spans)


class JinjaChatTemplate:
    """A Jinja chat template rendered as `transformers.apply_chat_template` renders it, with prefix-derived spans."""

    def __init__(self, template: str, special_tokens: dict[str, str]):
        self.template = template
        self.special_tokens = special_tokens  # bos_token / eos_token strings the template may use
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:  # transformers < 4.48: the compiled template renders the same way
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(template)
            self._render = lambda messages, add_generation_prompt: compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
        else:
            self._render = lambda messages, add_generation_prompt: render_jinja_template(
                conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
                **special_tokens)[0][0]

    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self._render(list(messages), add_generation_prompt)

    def __call__(self, messages: Sequence[dict]) -> Rendered:
        from jinja2.exceptions import TemplateError

        try:
            text = self.render_text(messages)
            spans = []
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                before = self.render_text(messages[:index], add_generation_prompt=True)
                through = self.render_text(messages[: index + 1])
                if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                    raise RowError(
                        f"the chat template does not render message {index} as a prefix of the conversation, so the "
                        "assistant tokens cannot be located; use a built-in chat_template (llama3, chatml, llama2)"
                    )
                spans.append((len(before), max(len(before), len(through.rstrip()))))
        except TemplateError as err:
            raise RowError(f"the chat template failed: {err}") from None
        return Rendered(text, spans)


class PromptRenderer:
    """Turns an `Example` into `Rendered` text with the chosen prompt format.

    `template` is a built-in name (alpaca, llama2, llama3, chatml) or a Jinja string. Text examples ignore it
    (`[bos] + text + [eos]`, all trained). Picklable, so worker processes can use it.
    """

    def __init__(self, template: str, *, bos_token: str, eos_token: str):
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._jinja = None

    def __getstate__(self):
        return {**self.__dict__, "_jinja": None}

    def __call__(self, example: Example) -> Rendered:
        if example.kind == "text":
            return Rendered(example.text, [(0, len(example.text))], add_bos=True, add_eos=True,
                            special_text=False)
        if self.template == "alpaca":
            if example.kind != "instruct":
                raise RowError("chat_template 'alpaca' renders instruct rows only; use llama3, chatml or llama2 "
                               "(or the tokenizer's template) for chat data")
            prompt = alpaca_prompt(example.instruction, example.input)
            return Rendered(prompt + example.output, [(len(prompt), len(prompt) + len(example.output))],
                            add_bos=True, add_eos=True, special_text=False)
        messages = example.as_messages()
        if self.template == "llama3":
            return render_llama3(messages, bos_token=self.bos_token)
        if self.template == "chatml":
            return render_chatml(messages)
        if self.template == "llama2":
            return render_llama2(messages, bos_token=self.bos_token, eos_token=self.eos_token)
        if self._jinja is None:
            self._jinja = JinjaChatTemplate(self.template, {"bos_token": self.bos_token, "eos_token": self.eos_token})
        return self._jinja(messages)


def resolve_template(chat_template: str | None, tokenizer: object, dataset_format: str) -> str:
    """The prompt format to use: a built-in name or a Jinja string.

    None means the tokenizer's own `chat_template` when it has one, else `alpaca` for instruct data and `chatml`
    for chat data. `"tokenizer"` insists on the tokenizer's template.
    """
    own = getattr(tokenizer, "chat_template", None) or None
    if chat_template is None:
        if own is not None and dataset_format != "text":
            return own
        return "alpaca" if dataset_format == "instruct" else "chatml"
    if chat_template == TOKENIZER_TEMPLATE:
        if own is None:
            raise ConfigError("chat_template is 'tokenizer' but the tokenizer has no chat template; "
                              f"use one of {', '.join(BUILTIN_TEMPLATES)}")
        return own
    if chat_template in BUILTIN_TEMPLATES or "{{" in chat_template or "{%" in chat_template:
        if chat_template == "alpaca" and dataset_format == "chat":
            raise ConfigError("chat_template 'alpaca' renders instruct data only; for chat data use "
                              "llama3, chatml, llama2 or tokenizer")
        return chat_template
    raise ConfigError(f"chat_template {chat_template!r} is not a known prompt format; use one of "
                      f"{', '.join(BUILTIN_TEMPLATES)}, tokenizer, a Jinja template string, or null")

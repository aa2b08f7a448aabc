"""Row formats: validate one raw row and render it as text segments, each trained on or not.

``alpaca`` (instruction, input?, output), ``prompt_completion``, ``chat`` (a list of
{role, content}; only assistant turns are trained) and ``classification`` (text, text_pair?,
label). For a causal LM a classification row becomes instruction data through
``data.prompt_template`` / ``data.completion_template`` (placeholders ``{text}``, ``{text_pair}``,
``{label}``). Field names come from `DataConfig`. A bad row raises `DataError` naming the file,
the 1-based line or row, and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from ctrlora.config import DataConfig
from ctrlora.errors import ConfigError, DataError

FORMATS = ("alpaca", "prompt_completion", "chat", "classification")

# The Stanford Alpaca templates (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
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
TEMPLATE_PLACEHOLDERS = ("text", "text_pair", "label")


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text; the loss covers exactly the tokens of trained segments."""

    text: str
    trained: bool


@dataclass(frozen=True)
class ClassificationRow:
    text: str
    text_pair: str | None
    label: str | int


def check_format(cfg: DataConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(
            f"data.format={cfg.format!r} is not a known format; choose one of {', '.join(FORMATS)}"
        )


def expected_fields(cfg: DataConfig) -> str:
    """The fields a format reads, as named in the config (``?`` marks optional ones)."""
    if cfg.format == "alpaca":
        return f"{cfg.instruction_field}, {cfg.input_field}?, {cfg.output_field}"
    if cfg.format == "prompt_completion":
        return f"{cfg.prompt_field}, {cfg.completion_field}"
    if cfg.format == "chat":
        return f"{cfg.messages_field} (a list of {{role, content}})"
    pair = f", {cfg.text_pair_field}" if cfg.text_pair_field else ""
    return f"{cfg.text_field}{pair}, {cfg.label_field}"


def field_value(
    row: Mapping[str, Any], field: str, where: str, cfg: DataConfig, kinds: tuple[type, ...] = (str,)
) -> Any:
    """``row[field]`` checked to be one of ``kinds``; a missing or mistyped field names file/line/field."""
    context = f"(format {cfg.format} expects {expected_fields(cfg)})"
    if field not in row or row[field] is None:
        raise DataError(f"{where}: field '{field}' missing {context}")
    value = row[field]
    if not isinstance(value, kinds):
        kind_names = " or ".join(kind.__name__ for kind in kinds)
        raise DataError(
            f"{where}: field '{field}' must be {kind_names}, got {type(value).__name__} {context}"
        )
    return value


def alpaca_segments(row: Mapping[str, Any], where: str, cfg: DataConfig) -> list[Segment]:
    """The Alpaca prompt (with or without input: a missing, null or empty input selects the latter)."""
    instruction = field_value(row, cfg.instruction_field, where, cfg)
    output = field_value(row, cfg.output_field, where, cfg)
    has_input = row.get(cfg.input_field) not in (None, "")
    if has_input:
        prompt = ALPACA_PROMPT_WITH_INPUT.format(
            instruction=instruction, input=field_value(row, cfg.input_field, where, cfg)
        )
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [Segment(prompt, False), Segment(output, True)]


def prompt_completion_segments(row: Mapping[str, Any], where: str, cfg: DataConfig) -> list[Segment]:
    """The prompt and the completion verbatim (no separator is inserted)."""
    prompt = field_value(row, cfg.prompt_field, where, cfg)
    return [Segment(prompt, False), Segment(field_value(row, cfg.completion_field, where, cfg), True)]


def chat_messages(row: Mapping[str, Any], where: str, cfg: DataConfig) -> list[dict[str, str]]:
    """The validated message list: {role, content} strings, ending with an assistant turn."""
    messages = field_value(row, cfg.messages_field, where, cfg, kinds=(list,))
    for index, message in enumerate(messages):
        field = f"{cfg.messages_field}[{index}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: field '{field}' must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where}: field '{field}.{key}' missing or not a string")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{cfg.messages_field}' must end with an assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def plain_chat_segments(messages: list[dict[str, str]]) -> list[Segment]:
    """``role: content`` lines; an assistant turn's content and newline are trained."""
    segments = []
    for message in messages:
        if message["role"] == "assistant":
            segments += [Segment("assistant: ", False), Segment(message["content"] + "\n", True)]
        else:
            segments.append(Segment(f"{message['role']}: {message['content']}\n", False))
    return segments


def chat_template_segments(
    messages: list[dict[str, str]], where: str, tokenizer: PreTrainedTokenizerBase
) -> list[Segment]:
    """Segments from the tokenizer's chat template: an assistant turn is what rendering it adds.

    For assistant turn i, ``render(messages[:i], add_generation_prompt=True)`` must be a prefix of
    ``render(messages[:i+1])``; the difference (content plus the template's end-of-turn text) is
    trained, everything else is not.
    """

    def render(part: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                part, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:  # jinja raises its own errors for unsupported role orders
            raise DataError(
                f"{where}: the tokenizer's chat template failed on this conversation: {error}"
            ) from None

    segments, rendered = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:index], True), render(messages[: index + 1], False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render turns as prefixes of the whole "
                "conversation, so assistant turns cannot be located; set the tokenizer's chat_template to None "
                "to use the plain 'role: content' rendering"
            )
        segments += [Segment(prompt[len(rendered) :], False), Segment(full[len(prompt) :], True)]
        rendered = full
    return [segment for segment in segments if segment.text]


def uses_chat_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Chat rows go through the tokenizer's chat template when it has one (then the template places
    the special tokens, so the text is tokenized without adding them)."""
    return cfg.format == "chat" and getattr(tokenizer, "chat_template", None) is not None


def classification_row(row: Mapping[str, Any], where: str, cfg: DataConfig) -> ClassificationRow:
    text = field_value(row, cfg.text_field, where, cfg)
    text_pair = field_value(row, cfg.text_pair_field, where, cfg) if cfg.text_pair_field else None
    return ClassificationRow(text, text_pair, field_value(row, cfg.label_field, where, cfg, kinds=(str, int)))


def fill_template(template: str, key: str, example: ClassificationRow) -> str:
    """``template`` with ``{text}``, ``{text_pair}`` and ``{label}`` filled in."""
    try:
        return template.format(text=example.text, text_pair=example.text_pair or "", label=example.label)
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            f"{key}={template!r} is not a valid template ({type(error).__name__}: {error}); "
            f"its placeholders must be among {', '.join('{' + p + '}' for p in TEMPLATE_PLACEHOLDERS)}"
        ) from None


def classification_prompt(example: ClassificationRow, cfg: DataConfig) -> str:
    """The causal-LM prompt of a classification row (also what an evaluator should score from)."""
    return fill_template(cfg.prompt_template, "data.prompt_template", example)


def classification_completion(example: ClassificationRow, cfg: DataConfig) -> str:
    """The causal-LM target of a classification row, e.g. ``' science'``."""
    return fill_template(cfg.completion_template, "data.completion_template", example)


def causal_segments(
    row: Mapping[str, Any], where: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> list[Segment]:
    """Render one row of any format as causal-LM text segments."""
    check_format(cfg)
    if cfg.format == "alpaca":
        return alpaca_segments(row, where, cfg)
    if cfg.format == "prompt_completion":
        return prompt_completion_segments(row, where, cfg)
    if cfg.format == "chat":
        messages = chat_messages(row, where, cfg)
        if uses_chat_template(cfg, tokenizer):
            return chat_template_segments(messages, where, tokenizer)
        return plain_chat_segments(messages)
    example = classification_row(row, where, cfg)
    return [
        Segment(classification_prompt(example, cfg), False),
        Segment(classification_completion(example, cfg), True),
    ]

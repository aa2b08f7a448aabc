"""Tokenisation: causal-LM examples with the prompt masked from the loss, and classification inputs.

Causal LM: the whole text of an example is tokenized at once (so tokens merge exactly as they
would at inference) and a token is supervised iff its character span overlaps a trained segment;
the others get label -100 (``IGNORE_INDEX``, skipped by the cross-entropy). ``labels[i] =
input_ids[i]`` where supervised: the model shifts them itself (token i+1 is predicted from the
first i). EOS is appended, supervised, unless the text already ends with it. Longer than
``max_length``: tokens are dropped from the start of the prompt (after leading special tokens,
e.g. BOS) so the completion survives; if the completion alone is too long it is cut at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from ctrlora.data.formats import Segment
from ctrlora.errors import ConfigError

IGNORE_INDEX = -100
TokenizedExample = dict[str, list[int] | int]  # labels: a list (causal LM) or a class id


def trained_char_ranges(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """Half-open character ranges [start, end) of the trained segments in the joined text."""
    ranges, position = [], 0
    for segment in segments:
        if segment.trained and segment.text:
            ranges.append((position, position + len(segment.text)))
        position += len(segment.text)
    return ranges


def overlaps(span: tuple[int, int], ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether a non-empty token span [start, end) shares a character with any of ``ranges``."""
    start, end = span
    return end > start and any(start < range_end and end > range_start for range_start, range_end in ranges)


def truncate_prompt_first(
    input_ids: list[int], labels: list[int], max_length: int, protected_prefix: int
) -> tuple[list[int], list[int]]:
    """Cut to ``max_length``: first from the prompt (after ``protected_prefix`` tokens), then the end."""
    excess = len(input_ids) - max_length
    if excess <= 0:
        return input_ids, labels
    first_supervised = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    drop = min(excess, max(0, first_supervised - protected_prefix))
    keep = list(range(protected_prefix)) + list(range(protected_prefix + drop, len(input_ids)))
    keep = keep[:max_length]
    return [input_ids[i] for i in keep], [labels[i] for i in keep]


def leading_special_tokens(input_ids: Sequence[int], special_ids: set[int]) -> int:
    count = 0
    while count < len(input_ids) and input_ids[count] in special_ids:
        count += 1
    return count


def tokenize_causal(
    segment_lists: Sequence[Sequence[Segment]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    add_special_tokens: bool = True,
) -> list[TokenizedExample]:
    """``{input_ids, labels}`` per example (see the module docstring for the masking rule)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; causal-LM data needs one")
    texts = ["".join(segment.text for segment in segments) for segments in segment_lists]
    try:
        encoding = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} cannot return offset mappings ({error}); "
            "prompt masking needs a fast (Rust `tokenizers`) tokenizer"
        ) from None
    eos, special_ids = tokenizer.eos_token_id, set(tokenizer.all_special_ids)
    examples = []
    for segments, input_ids, offsets in zip(
        segment_lists, encoding["input_ids"], encoding["offset_mapping"], strict=True
    ):
        ranges = trained_char_ranges(segments)
        labels = [
            token if overlaps(span, ranges) else IGNORE_INDEX
            for token, span in zip(input_ids, offsets, strict=True)
        ]
        input_ids = list(input_ids)
        if not input_ids or input_ids[-1] != eos:
            input_ids.append(eos)
            labels.append(eos)
        protected = leading_special_tokens(input_ids, special_ids)
        input_ids, labels = truncate_prompt_first(input_ids, labels, max_length, min(protected, max_length))
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def tokenize_classification(
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    label_ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> list[TokenizedExample]:
    """``{input_ids, [token_type_ids,] labels}`` for a sequence-classification head.

    ``labels`` is the class id (an int, not a list); pairs are truncated longest-first.
    """
    encoding = tokenizer(
        list(texts), list(text_pairs) if text_pairs else None, truncation=True, max_length=max_length
    )
    kept = [key for key in ("input_ids", "token_type_ids") if key in encoding]
    return [
        {**{key: list(encoding[key][i]) for key in kept}, "labels": label_id}
        for i, label_id in enumerate(label_ids)
    ]

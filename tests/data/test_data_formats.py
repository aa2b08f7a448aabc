"""Formats render the expected text and supervise exactly the completion tokens; bad rows name file/line/field."""

from __future__ import annotations

import pytest

from ctrlora.backbones import build_tiny_tokenizer
from ctrlora.config import DataConfig
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.data.formats import ALPACA_PROMPT_NO_INPUT, causal_segments, uses_chat_template
from ctrlora.data.tokenization import IGNORE_INDEX, tokenize_causal, tokenize_classification
from ctrlora.errors import ConfigError, DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(row: dict, cfg: DataConfig, tokenizer, max_length: int = 4096) -> dict:
    segments = causal_segments(row, "rows.jsonl line 1", cfg, tokenizer)
    return tokenize_causal([segments], tokenizer, max_length, not uses_chat_template(cfg, tokenizer))[0]


def assert_prompt_then_completion(example: dict, tokenizer, prompt: str, completion: str) -> None:
    """input = BOS prompt completion EOS; labels = -100 on BOS and prompt, the ids on completion and EOS."""
    prompt_ids, completion_ids = ids(tokenizer, prompt), ids(tokenizer, completion)
    eos = [tokenizer.eos_token_id]
    assert example["input_ids"] == [tokenizer.bos_token_id] + prompt_ids + completion_ids + eos
    assert example["labels"] == [IGNORE_INDEX] * (1 + len(prompt_ids)) + completion_ids + eos


def test_alpaca_with_input_uses_the_standard_template(tokenizer):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert_prompt_then_completion(encode(row, DataConfig(format="alpaca"), tokenizer), tokenizer, prompt, "5")


@pytest.mark.parametrize(
    "row",
    [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say hi.", "input": "", "output": "hi"}],
)
def test_alpaca_without_input(tokenizer, row):
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in prompt
    assert_prompt_then_completion(
        encode(row, DataConfig(format="alpaca"), tokenizer), tokenizer, prompt, "hi"
    )


def test_prompt_completion_with_renamed_fields(tokenizer):
    cfg = DataConfig(format="prompt_completion", prompt_field="q", completion_field="a")
    example = encode({"q": "2+2=", "a": " 4"}, cfg, tokenizer)
    assert_prompt_then_completion(example, tokenizer, "2+2=", " 4")


def test_classification_renders_through_the_templates(tokenizer):
    example = encode({"text": "E = mc^2", "label": "science"}, DataConfig(), tokenizer)
    prompt = "E = mc^2\nWhat is the topic of this quotation?\nTopic:"
    assert_prompt_then_completion(example, tokenizer, prompt, " science")


def test_plain_chat_trains_only_assistant_turns(plain_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    example = encode({"messages": messages}, DataConfig(format="chat"), plain_tokenizer)
    pieces = [
        ("system: Be brief.\nuser: Hi\nassistant: ", False),
        ("Hello\n", True),
        ("user: Bye\nassistant: ", False),
        ("Ciao\n", True),
    ]
    expected_ids, expected_labels = [plain_tokenizer.bos_token_id], [IGNORE_INDEX]
    for text, trained in pieces:
        expected_ids += ids(plain_tokenizer, text)
        expected_labels += (
            ids(plain_tokenizer, text) if trained else [IGNORE_INDEX] * len(ids(plain_tokenizer, text))
        )
    eos = plain_tokenizer.eos_token_id
    assert example == {"input_ids": expected_ids + [eos], "labels": expected_labels + [eos]}


def test_chat_template_marks_what_the_template_adds_for_assistant_turns():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHATML
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    example = encode({"messages": messages}, DataConfig(format="chat"), tokenizer)
    prompt, answer = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello<|im_end|>\n"
    eos = [tokenizer.eos_token_id]
    assert example["input_ids"] == ids(tokenizer, prompt) + ids(tokenizer, answer) + eos  # no BOS added
    assert example["labels"] == [IGNORE_INDEX] * len(ids(tokenizer, prompt)) + ids(tokenizer, answer) + eos


def test_long_prompt_is_cut_from_its_start_keeping_bos_and_completion(tokenizer):
    example = encode(
        {"prompt": "abcdefghij", "completion": "XY"}, DataConfig(format="prompt_completion"), tokenizer, 8
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert example["input_ids"] == [bos] + ids(tokenizer, "ghijXY") + [eos]
    assert example["labels"] == [IGNORE_INDEX] * 5 + ids(tokenizer, "XY") + [eos]
    example = encode(
        {"prompt": "ab", "completion": "0123456789"}, DataConfig(format="prompt_completion"), tokenizer, 6
    )
    # the completion alone is too long: it is cut at the end
    assert example["input_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "01234")
    assert example["labels"] == [IGNORE_INDEX] + ids(tokenizer, "01234")


def test_sequence_classification_inputs_and_pairs(tokenizer):
    examples = tokenize_classification(["ab", "c"], ["x", "yz"], [1, 0], tokenizer, max_length=16)
    assert examples[0]["input_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "abx")
    assert [example["labels"] for example in examples] == [1, 0]


@pytest.mark.parametrize(
    ("cfg", "bad_row", "message"),
    [
        (
            DataConfig(format="alpaca"),
            {"instruction": "x"},
            "field 'output' missing (format alpaca expects instruction, input?, output)",
        ),
        (
            DataConfig(format="alpaca", output_field="response"),
            {"instruction": "x", "response": 5},
            "field 'response' must be str, got int",
        ),
        (
            DataConfig(format="alpaca"),
            {"instruction": "x", "input": ["y"], "output": "z"},
            "field 'input' must be str, got list",
        ),
        (DataConfig(format="prompt_completion"), {"prompt": "x"}, "field 'completion' missing"),
        (
            DataConfig(format="chat"),
            {"messages": [{"role": "user"}]},
            "field 'messages[0].content' missing or not a string",
        ),
        (
            DataConfig(format="chat"),
            {"messages": [{"role": "user", "content": "x"}]},
            "must end with an assistant message",
        ),
        (DataConfig(), {"text": "x"}, "field 'label' missing (format classification expects text, label)"),
        (DataConfig(), {"text": 3, "label": "y"}, "field 'text' must be str, got int"),
    ],
)
def test_bad_row_names_file_line_and_field(tokenizer, write_jsonl, cfg, bad_row, message):
    good = {
        "instruction": "i",
        "input": "",
        "output": "o",
        "response": "o",
        "prompt": "p",
        "completion": "c",
        "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        "text": "t",
        "label": "l",
    }
    path = write_jsonl("rows.jsonl", [good, good, bad_row])
    cfg.train, cfg.test = str(path), None
    with pytest.raises(DataError) as error:
        FinetuneDataModule(cfg, tokenizer).setup()
    assert str(error.value).startswith(f"{path} line 3: ")
    assert message in str(error.value)


def test_bad_test_row_fails_at_setup(tokenizer, write_jsonl):
    train = write_jsonl("train.jsonl", [{"text": "a", "label": "x"}])
    test = write_jsonl("test.jsonl", [{"text": "b", "label": "x"}, {"text": "c", "label": "unseen"}])
    with pytest.raises(DataError, match=rf"{test} line 2: label 'unseen' does not occur in data.train"):
        FinetuneDataModule(DataConfig(train=str(train), test=str(test)), tokenizer).setup()


def test_config_errors_name_key_and_choices(tokenizer):
    with pytest.raises(
        ConfigError, match="data.format='csv'.*alpaca, prompt_completion, chat, classification"
    ):
        FinetuneDataModule(DataConfig(format="csv"), tokenizer)
    with pytest.raises(ConfigError, match="model.task='seq2seq'.*causal_lm, sequence_classification"):
        FinetuneDataModule(DataConfig(), tokenizer, task="seq2seq")
    with pytest.raises(ConfigError, match="needs data.format=classification"):
        FinetuneDataModule(DataConfig(format="alpaca"), tokenizer, task="sequence_classification")
    with pytest.raises(ConfigError, match=r"data.prompt_template=.*\{text\}, \{text_pair\}, \{label\}"):
        FinetuneDataModule(DataConfig(prompt_template="{quote} Topic:"), tokenizer).setup()

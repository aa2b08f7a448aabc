"""eval=local: the quotation-topic test split as an lm-eval multiple-choice task over 8 topics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from lm_eval.utils import apply_template

from ctrlora.errors import DataError
from ctrlora.evaluation.suite import evaluate_backbone
from ctrlora.evaluation.tasks import format_to_jinja, write_task_yamls
from evaluation.helpers import choice_loglikelihoods, train_config

TOPICS = ["computers", "food", "law", "medicine", "politics", "science", "sports", "startrek"]


def test_local_task_accuracy_matches_a_direct_loglikelihood_oracle(tiny, tmp_path: Path) -> None:
    _, tokenizer, backbone = tiny
    cfg = train_config(["eval=local", "eval.limit=8"], tmp_path)
    section = evaluate_backbone(backbone, tokenizer, cfg.eval, base_model_key="tiny", cache_root=tmp_path)

    assert section["versions"]["samples"] == {"fortune_topics": 8}
    assert section["versions"]["num_fewshot"] == {"fortune_topics": 0}
    rows = [json.loads(line) for line in Path("data/fortune_topics/test.jsonl").read_text().splitlines()[:8]]
    backbone.eval()
    correct = []
    for row in rows:
        context = f"{row['text']}\nWhat is the topic of this quotation?\nTopic:"
        scores = choice_loglikelihoods(backbone, tokenizer, context, TOPICS)
        correct.append(TOPICS[int(torch.tensor(scores).argmax())] == row["label"])
    accuracy = sum(correct) / len(correct)
    entry = section["fortune_topics"]["acc"]
    assert entry["value"] == pytest.approx(accuracy, abs=1e-12)
    assert entry["stderr"] == pytest.approx(
        (accuracy * (1 - accuracy) / (len(correct) - 1)) ** 0.5, abs=1e-12
    )


def test_prompt_templates_render_in_lm_eval_as_str_format_does() -> None:
    row = {"text": "Ship it.", "label": "computers"}
    for template in (
        "{text}\nWhat is the topic of this quotation?\nTopic:",
        "{{json}} {text} {label}{{",
        "plain",
    ):
        assert apply_template(format_to_jinja(template), row) == template.format(**row)


def test_a_label_outside_the_choices_names_the_row(tmp_path: Path) -> None:
    test_file = tmp_path / "test.jsonl"
    test_file.write_text('{"text": "a", "label": "food"}\n{"text": "b", "label": "poetry"}\n')
    cfg = train_config(["eval=local", f"eval.tasks.fortune_topics.local.test={test_file}"], tmp_path)
    with pytest.raises(DataError, match=r"test.jsonl line 2: label='poetry' is not one of the choices"):
        write_task_yamls(cfg.eval, tmp_path)


def test_inputs_cut_to_the_context_window_are_reported_once(tiny, tmp_path: Path, caplog) -> None:
    _, tokenizer, backbone = tiny
    cfg = train_config(["eval=local", "eval.limit=2", "eval.max_length=16"], tmp_path)
    with caplog.at_level(logging.WARNING):
        evaluate_backbone(backbone, tokenizer, cfg.eval, base_model_key="tiny", cache_root=tmp_path)

    assert not [r for r in caplog.records if "Truncating" in r.getMessage()]
    summaries = [r.getMessage() for r in caplog.records if "longer than the context window" in r.getMessage()]
    assert summaries == [
        f"fortune_topics: {2 * len(TOPICS)} log-likelihood inputs were longer than the context window "
        "(16 tokens) and lost their oldest tokens (eval.max_length sets the window)"
    ]

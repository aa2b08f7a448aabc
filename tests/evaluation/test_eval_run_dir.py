"""A trained run evaluated three ways agrees: in memory (as in the run), evaluate.py on the saved
run dir, and lm-eval's own entry point with ``peft=<run_dir>/adapter``; and the base row taken
with the adapter disabled equals the freshly loaded backbone's."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FAST, ROOT, compose_config
from hydra import compose, initialize_config_dir
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from omegaconf import OmegaConf

from ctrlora import report
from ctrlora.backbones import load_backbone, resolve_source
from ctrlora.evaluation.base_row import backbone_key
from ctrlora.evaluation.cli import evaluate_saved, register_evaluate_config
from ctrlora.evaluation.sections import task_rows
from ctrlora.evaluation.suite import evaluate_backbone, evaluate_model
from ctrlora.run import assemble

LIMIT, CONTEXT = 6, 96  # documents, and lm-eval's context window (left-truncated; keeps the test fast)


def test_saved_run_reproduces_the_in_memory_numbers_and_stock_lm_eval_agrees(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    composed = compose_config(
        [
            f"run_dir={run_dir}",
            *FAST,
            "trainer.max_steps=6",
            "optim.lr=5e-3",
            "data.max_length=64",
            "eval=local",
            f"eval.limit={LIMIT}",
            f"eval.max_length={CONTEXT}",
            "eval.tasks.fortune_topics.metrics=[acc,brier_score]",
            f"eval.cache_dir={tmp_path / 'cache'}",
        ]
    )
    cfg = OmegaConf.to_object(composed)
    run_dir.mkdir()
    OmegaConf.save(composed, run_dir / "config.yaml", resolve=True)
    run = assemble(cfg, run_dir)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    key = backbone_key(cfg.model)
    in_run = evaluate_model(run.model, run.tokenizer, cfg.eval, base_model_key=key)  # what the run records
    report.save_adapter(run.method, run.model, run.tokenizer, run_dir / "adapter")
    report.write_json(run_dir / "results.json", {"run": {"method": "lora"}, "train": {"steps": 6}})

    # the base row taken inside model.disable_adapter() is the backbone's own
    fresh = evaluate_backbone(
        load_backbone(cfg.model),
        run.tokenizer,
        cfg.eval,
        base_model_key="fresh",
        cache_root=tmp_path / "fresh",
    )
    assert in_run["base"] == task_rows(fresh)

    # evaluate.py on the run dir (composed like the command line): merged into results.json when the
    # run recorded the same limit; a limited evaluation of a run scored otherwise goes to its own file
    register_evaluate_config()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        evaluate_cfg = OmegaConf.to_object(compose("evaluate", overrides=[f"run_dir={run_dir}"]))
    saved = evaluate_saved(evaluate_cfg)
    assert json.loads((run_dir / "results.json").read_text()) == {"run": {"method": "lora"}, "train": {"steps": 6}}
    assert json.loads((run_dir / "eval_limited.json").read_text()) == saved  # no recorded numbers at this limit
    report.write_json(run_dir / "results.json", {"run": {"method": "lora"}, "train": {"steps": 6}, "eval": in_run})
    assert evaluate_saved(evaluate_cfg) == saved
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"] == {"steps": 6} and results["eval"] == saved  # the run's own limit: merged
    assert task_rows(saved) == task_rows(in_run) and saved["base"] == in_run["base"]
    assert (
        saved["fortune_topics"]["brier_score"]["value"]
        != saved["base"]["fortune_topics"]["brier_score"]["value"]
    )

    # lm-eval's own entry point: the backbone by path plus peft=<adapter>, on the generated task
    stock = simple_evaluate(
        model="hf",
        model_args={
            "pretrained": resolve_source(cfg.model),
            "peft": str(run_dir / "adapter"),
            "dtype": "float32",
            "device": "cpu",
            "max_length": CONTEXT,
        },
        tasks=["fortune_topics"],
        limit=LIMIT,
        log_samples=False,
        task_manager=TaskManager(include_path=in_run["versions"]["task_dir"], include_defaults=False),
    )["results"]["fortune_topics"]
    assert stock["acc,none"] == in_run["fortune_topics"]["acc"]["value"]
    assert abs(stock["brier_score,none"] - in_run["fortune_topics"]["brier_score"]["value"]) < 1e-6

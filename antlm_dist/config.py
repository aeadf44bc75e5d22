"""Typed recipe configuration: dataclasses loaded from YAML, overridden by dotted keys.

Precedence: defaults < recipe YAML < ``section.key=value`` command-line overrides.
Unknown keys and wrong types are errors that name the field and list what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe field is missing, unknown, of the wrong type or inconsistent."""


@dataclass
class ModelConfig:
    """Backbone sizes. Field names follow Hugging Face ``LlamaConfig``."""

    arch: str = "llama"
    """Backbone family: ``llama`` (BabyLlama decoder) or ``ltg_bert`` (encoder)."""
    vocab_size: int = 16000
    """Rows of the embedding and LM head (tokens). Must equal the tokenizer's vocabulary."""
    hidden_size: int = 512
    """Width of the residual stream (features)."""
    intermediate_size: int = 1024
    """Width of the feed-forward inner layer (features)."""
    num_hidden_layers: int = 16
    """Transformer blocks."""
    num_attention_heads: int = 8
    """Query heads; head dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int | None = None
    """Grouped-query attention heads; ``None`` means ``num_attention_heads``."""
    max_position_embeddings: int = 256
    """Longest sequence (tokens) the model accepts; ``data.seq_len`` must not exceed it."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base period."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    attention: str = "auto"
    """Attention implementation: ``auto`` (``triton`` on CUDA, ``sdpa`` on CPU), ``sdpa``, ``triton`` or ``eager``."""
    loss: str = "auto"
    """Loss implementation for :func:`antlm_dist.kernels.masked_token_loss`: ``auto``, ``triton`` or ``torch``."""
    fused_kernels: str = "auto"
    """``llama`` RMSNorm, SwiGLU and RoPE: ``liger`` (liger-kernel's Triton kernels, CUDA, the ``gpu`` extra),
    ``torch``, or ``auto`` (liger on CUDA when installed, else torch); see :mod:`antlm_dist.model.fused`."""
    position_bucket_size: int = 32
    """``ltg_bert`` only: relative-position buckets S (even); distances within ±S/2 are exact, the table has 2S-1 rows."""
    max_relative_positions: int = 512
    """``ltg_bert`` only: the distance (tokens) that reaches the last logarithmic bucket (LTG-BERT: 512)."""
    hidden_dropout: float = 0.1
    """``ltg_bert`` only: dropout probability on embeddings and residual branches."""
    attention_dropout: float = 0.1
    """``ltg_bert`` only: dropout probability on attention weights and relative embeddings."""
    layer_norm_eps: float = 1e-7
    """``ltg_bert`` only: epsilon inside LayerNorm."""


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained with ``tokenizers`` (BabyLlama recipe), or a given file."""

    path: str | None = None
    """An existing ``tokenizer.json``; when unset a tokenizer is trained on the training split."""
    vocab_size: int | None = None
    """Vocabulary to train (tokens); ``None`` means ``model.vocab_size``."""
    min_frequency: int = 2
    """Minimum count of a pair for a BPE merge (BabyLlama: 2)."""
    kind: str = "bpe"
    """``bpe`` (byte-level BPE; special tokens ``<pad> <s> </s> <unk> <mask>``) or ``wordpiece``
    (LTG-BERT; ``[PAD] [CLS] [SEP] [UNK] [MASK]``). The trainer uses the roles pad/bos/eos/unk/mask."""
    normalization: str = "none"
    """``none`` (text kept as it is: a ``bpe`` tokenizer decodes exactly what it encoded) or ``nfkc``
    (Unicode NFKC first, as BabyLlama and LTG-BERT do: "ﬁ" becomes "fi", "₉" becomes "9")."""
    add_prefix_space: bool = False
    """``bpe`` only: put a space before the first word so it is tokenised like any other word
    (GPT-2's option; decoding then returns that extra leading space)."""


@dataclass
class DataConfig:
    """Corpus, packing and loader options."""

    corpus: Any = "bundled"
    """``bundled`` (the shipped public-domain demo corpus), a folder in the BabyLM layout, or a list of text files."""
    seq_len: int = 128
    """Tokens per packed block."""
    document_mask: bool = False
    """Emit ``segment_ids`` so attention stays within each line/document of a packed block."""
    max_train_blocks: int | None = None
    """Use only the first N packed training blocks (``None``: all). For quick demos."""
    max_eval_blocks: int | None = 64
    """Evaluate on at most N packed dev blocks per objective (``None``: all)."""
    num_proc: int = 2
    """Worker processes for ``datasets.map`` tokenisation."""
    cache_dir: str | None = None
    """Where tokenised corpora are cached; ``None`` means ``<output_dir>/cache``."""


@dataclass
class ObjectiveConfig:
    """The objective schedule and the masking of the MLM and MNTP objectives."""

    schedule: str = "4_CLM+16_MLM+4_CLM"
    """Phases in epochs, as in the AntLM paper (``N_CLM+M_MLM+...``); objectives CLM, MLM, MNTP;
    mixed phases ``N_CLM:MNTP=1:15``; per-phase mask rates ``@0.2`` or ``@0.30..0.15``
    (see :mod:`antlm_dist.schedule`)."""
    mlm_probability: float = 0.15
    """Fraction of non-special tokens selected for MLM and MNTP (BERT: 0.15); with
    ``mask_rate_end`` set, the rate at the first step."""
    mask_rate_end: float | None = None
    """When set, the selection rate falls (or rises) linearly from ``mlm_probability`` at the first
    step to this fraction at the last step of the run (GPT-BERT: 0.30 -> 0.15); a phase's own
    ``@`` rate takes precedence. ``None``: constant."""
    mlm_target: str = "same_position"
    """``same_position`` (BERT-style) or ``next_position`` (MNTP, as in GPT-BERT)."""
    masking: str = "token"
    """``token`` (BERT) or ``span`` (LTG-BERT)."""


@dataclass
class TrainConfig:
    """Optimisation. Batch sizes live here; the DeepSpeed JSON leaves them ``"auto"``."""

    seed: int = 42
    """Seeds the shuffle (per epoch), the MLM masks (per epoch and sample) and the initialisation."""
    micro_batch_size: int = 32
    """Sequences per rank per forward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    lr: float = 3e-4
    """Peak learning rate of the cosine schedule."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    warmup_steps: int = 100
    """Linear warm-up length (optimizer steps)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices and embeddings (not norms)."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.95
    """AdamW β2."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    optim: str = "adamw_torch_fused"
    """The AdamW implementation, named as Hugging Face's ``TrainingArguments.optim``:
    ``adamw_torch_fused`` (torch's one-kernel AdamW, ``fused=True``; the Trainer's default
    since torch 2.8) or ``adamw_torch`` (torch's default loop, ``foreach`` on CUDA). Same
    update rule; the results differ in the last bits. A resumed run keeps the implementation
    its checkpoint was written with (torch's ``load_state_dict`` restores the group options).
    Ignored when the DeepSpeed JSON has its own ``optimizer`` section."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    precision: str = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16`` or ``fp32``."""
    stop_at_step: int | None = None
    """Stop (after checkpointing) once this many optimizer steps are done; the LR schedule is unaffected."""
    max_words_seen: int | str | None = None
    """Word budget (whitespace-separated words of training text, as BabyLM counts them; ``100M``
    is the strict-small rule): the run ends, with its final evaluation and checkpoint, after the
    last step that keeps the words seen within it. An integer or e.g. ``100M``, ``50k``; the LR
    schedule is unaffected. ``None``: no budget."""
    log_every_steps: int = 1
    """Write a ``train`` record to metrics.jsonl every N steps."""
    max_nonfinite_steps: int = 3
    """Stop every rank (exit status 3, no checkpoint) after this many consecutive optimizer
    steps with a non-finite loss or gradient norm, or skipped by DeepSpeed for an overflow."""
    compile: bool | None = None
    """``torch.compile`` (Inductor) every transformer block: ``true``, ``false`` or unset (auto:
    on CUDA under ZeRO 0–2, eager on CPU and under ZeRO-3); see :mod:`antlm_dist.speedups`."""


@dataclass
class DistributedConfig:
    """Process-group settings."""

    deepspeed_config: str = "zero2.json"
    """A file in ``ds_configs/`` or a path to a DeepSpeed JSON (ZeRO stage, offload, communication)."""
    nproc_per_node: int = 2
    """Local ranks started when ``antlm-train`` is run without a launcher."""
    backend: str = "auto"
    """``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``."""
    timeout_minutes: float = 5.0
    """Collective timeout; a dead rank stops the others after at most this long."""
    single_rank_zero0: bool = True
    """With one rank, train under ZeRO stage 0 whatever the JSON's stage (unless it offloads):
    partitioning over one rank only adds flat-buffer copies. ``false`` keeps the JSON's stage."""


@dataclass
class EvalConfig:
    """Held-out evaluation on the corpus's ``.dev`` files."""

    at_phase_end: bool = True
    """Evaluate both objectives when a phase ends (and always at the end)."""
    at_start: bool = False
    """Also evaluate before the first step."""
    every_steps: int = 0
    """Extra evaluations every N steps (0: only at phase ends and at the end)."""
    micro_batch_size: int = 32
    """Sequences per rank per evaluation forward pass."""


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints under ``<output_dir>/checkpoints``."""

    every_steps: int = 0
    """Save every N optimizer steps (0: only at phase switches and at the end)."""
    at_phase_switch: bool = True
    """Checkpoint when a phase ends."""
    keep_last: int = 3
    """Complete checkpoints to keep (0: all)."""
    milestones_words: Any = "babylm"
    """Words seen at which to save a checkpoint and export it to ``<run>/hf/chck_<N>M``:
    ``babylm`` (1M … 10M every 1M, then 20M … 100M every 10M), a list such as ``[50k, 1M]``,
    ``every 50k``, or ``none``. See :mod:`antlm_dist.words`."""


@dataclass
class WandbConfig:
    """Weights & Biases run settings (``logging.wandb``); needs the ``wandb`` package."""

    project: str = "antlm-dist"
    """W&B project name."""
    mode: str = "offline"
    """``offline`` (writes ``<output_dir>/wandb/offline-run-*``; upload later with ``wandb sync``) or ``online``."""
    entity: str | None = None
    """W&B team or user; ``None`` means the account's default."""
    name: str | None = None
    """Run name; ``None`` means the recipe name."""


@dataclass
class LoggingConfig:
    """Progress on the console and in log files, experiment trackers and run plots (rank 0 only)."""

    progress_interval_s: float = 30.0
    """Log one progress line (step/total, phase, loss, tokens/s, ETA) about every N seconds of wall time,
    at most N s apart while steps take steady times (0: never), so that files and SLURM logs show
    progress; the bar shows only on a terminal."""
    tensorboard: bool = False
    """Write TensorBoard event files under ``<output_dir>/tensorboard`` (needs the ``tensorboard`` package)."""
    wandb: WandbConfig | None = None
    """Log to Weights & Biases with these settings, e.g. ``{project: babylm, mode: offline}``; ``None``: off."""
    plots: bool = True
    """Draw ``<output_dir>/plots/*.png`` when the run ends (as ``antlm-plot`` does); a failure only warns."""


@dataclass
class DebugConfig:
    """Fault injection and slow-downs for tests of the launchers; read once at start-up.
    Leave them at their defaults for real runs."""

    step_delay_s: float = 0.0
    """Sleep this many seconds in every optimizer step, before its closing all-reduce, so that
    a launcher test can signal, stop or kill a rank inside a step (a tiny test recipe otherwise
    trains a dozen steps in a second)."""
    fault_phase_rank: int | None = None
    """This global rank believes it trains the next phase, to test the phase-desync check."""


@dataclass
class Recipe:
    """A complete training recipe."""

    name: str = "custom"
    """Recipe name, shown in logs and summaries."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float and None for Optional."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: its own field errors
            return _build(sections[0], value, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{where + '.' if where else ''}{unknown[0]} is not a known field; "
            f"valid fields of {where or 'the recipe'}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``section.key=value`` strings; values are read as YAML scalars or lists.

    Raises:
        ConfigError: an item without ``=``.
    """
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``antlm_dist/recipes`` (without ``.yaml``)."""
    files = resources.files("antlm_dist.recipes")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped recipe such as ``demo-cpu``.

    Raises:
        ConfigError: neither a file nor a shipped recipe.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = resources.files("antlm_dist.recipes") / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(
        f"--config {name_or_path!r}: no such file and no shipped recipe of that name; "
        f"shipped recipes: {', '.join(builtin_recipes())}"
    )


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from YAML (or defaults when ``None``) and apply dotted overrides.

    Raises:
        ConfigError: unreadable YAML, unknown fields, wrong types, invalid values.
    """
    tree: dict = {}
    if name_or_path is not None:
        path = resolve_recipe_path(name_or_path)
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return recipe_from_dict(tree)


def recipe_from_dict(tree: dict) -> Recipe:
    """Rebuild a recipe saved with :meth:`Recipe.to_dict` (e.g. from a checkpoint)."""
    recipe = _build(Recipe, tree, "")
    validate_recipe(recipe)
    return recipe


def _choice(value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r} is not allowed; use one of: {', '.join(allowed)}")


def _positive(value: float | int | None, where: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):  # nan passes every comparison below; inf overflows timers and schedules
        raise ConfigError(f"{where}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _validate_ltg_bert(m: ModelConfig) -> None:
    if m.attention == "triton":
        raise ConfigError("model.attention=triton is not available for model.arch=ltg_bert (the Triton kernel "
                          "takes no relative-position bias); use model.attention=sdpa or eager")
    if m.num_key_value_heads not in (None, m.num_attention_heads):
        raise ConfigError("model.num_key_value_heads must be unset for model.arch=ltg_bert (no grouped-query attention)")
    if m.fused_kernels == "liger":
        raise ConfigError("model.fused_kernels=liger is for model.arch=llama (RMSNorm, SwiGLU, RoPE); LTG-BERT has "
                          "none of them: use model.fused_kernels=auto or torch")
    if m.position_bucket_size < 2 or m.position_bucket_size % 2:
        raise ConfigError(f"model.position_bucket_size={m.position_bucket_size} must be even and >= 2, e.g. 32")
    if m.max_relative_positions <= m.position_bucket_size // 2 + 1:
        raise ConfigError(f"model.max_relative_positions={m.max_relative_positions} must exceed "
                          f"model.position_bucket_size/2 + 1 = {m.position_bucket_size // 2 + 1}, e.g. 512")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise ConfigError(f"model.{name}={getattr(m, name)} must be in [0, 1)")
    _positive(m.layer_norm_eps, "model.layer_norm_eps")


def _validate_tokenizer(r: Recipe) -> None:
    t = r.tokenizer
    _choice(t.normalization, ("none", "nfkc"), "tokenizer.normalization")
    if t.add_prefix_space and t.kind != "bpe":
        raise ConfigError("tokenizer.add_prefix_space applies to tokenizer.kind=bpe only; set it to false")


def validate_recipe(r: Recipe) -> None:
    """Check values and cross-field consistency before any compute starts.

    Raises:
        ConfigError: naming the field and the fix.
    """
    from antlm_dist.schedule import parse_schedule  # local: schedule imports nothing from here

    m = r.model
    _choice(m.arch, ("llama", "ltg_bert"), "model.arch")
    _choice(m.attention, ("auto", "sdpa", "triton", "eager"), "model.attention")
    _choice(m.loss, ("auto", "triton", "torch"), "model.loss")
    _choice(m.fused_kernels, ("auto", "liger", "torch"), "model.fused_kernels")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
        _positive(getattr(m, name), f"model.{name}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} must be a multiple of model.num_attention_heads={m.num_attention_heads}"
        )
    _positive(m.num_key_value_heads, "model.num_key_value_heads")  # None: as many as num_attention_heads
    kv = m.num_key_value_heads or m.num_attention_heads
    if m.num_attention_heads % kv:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} must be a multiple of model.num_key_value_heads={kv}"
        )
    _positive(r.data.seq_len, "data.seq_len")
    if r.data.seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={r.data.seq_len} is greater than model.max_position_embeddings="
            f"{m.max_position_embeddings}; lower data.seq_len or raise model.max_position_embeddings"
        )
    _positive(r.data.max_train_blocks, "data.max_train_blocks")
    _positive(r.data.max_eval_blocks, "data.max_eval_blocks")
    _positive(r.data.num_proc, "data.num_proc")
    if r.tokenizer.vocab_size is not None and r.tokenizer.vocab_size != m.vocab_size:
        raise ConfigError(
            f"tokenizer.vocab_size={r.tokenizer.vocab_size} differs from model.vocab_size={m.vocab_size}; "
            "set them equal (or leave tokenizer.vocab_size unset)"
        )
    _positive(r.tokenizer.min_frequency, "tokenizer.min_frequency")
    _choice(r.tokenizer.kind, ("bpe", "wordpiece"), "tokenizer.kind")
    _validate_tokenizer(r)
    if m.arch == "ltg_bert":
        _validate_ltg_bert(m)
    parse_schedule(r.objective.schedule)
    if not 0.0 < r.objective.mlm_probability < 1.0:
        raise ConfigError(f"objective.mlm_probability={r.objective.mlm_probability} must be in (0, 1), e.g. 0.15")
    end = r.objective.mask_rate_end
    if end is not None and not 0.0 < end < 1.0:
        raise ConfigError(f"objective.mask_rate_end={end} must be in (0, 1), e.g. 0.15 (or unset for a constant rate)")
    _choice(r.objective.mlm_target, ("same_position", "next_position"), "objective.mlm_target")
    _choice(r.objective.masking, ("token", "span"), "objective.masking")
    _validate_run_settings(r)


def _validate_run_settings(r: Recipe) -> None:
    """``train``, ``distributed``, ``eval``, ``checkpoint``, ``logging`` and ``debug``: ranges and choices."""
    t = r.train
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.gradient_accumulation_steps, "train.gradient_accumulation_steps")
    _positive(t.lr, "train.lr")
    _positive(t.warmup_steps, "train.warmup_steps", allow_zero=True)
    _positive(t.grad_clip, "train.grad_clip", allow_zero=True)
    _positive(t.stop_at_step, "train.stop_at_step")
    _positive(t.log_every_steps, "train.log_every_steps")
    _positive(t.max_nonfinite_steps, "train.max_nonfinite_steps")
    for name in ("adam_beta1", "adam_beta2"):  # Adam's moment decays (Kingma & Ba 2015, Alg. 1): [0, 1)
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be in [0, 1), e.g. 0.9 for adam_beta1 "
                              "and 0.95 for adam_beta2")
    _positive(t.adam_eps, "train.adam_eps")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _choice(t.precision, ("auto", "bf16", "fp16", "fp32"), "train.precision")
    _choice(t.optim, ("adamw_torch_fused", "adamw_torch"), "train.optim")
    _choice(r.distributed.backend, ("auto", "nccl", "gloo"), "distributed.backend")
    _positive(r.distributed.nproc_per_node, "distributed.nproc_per_node")
    _positive(r.distributed.timeout_minutes, "distributed.timeout_minutes")
    _positive(r.eval.micro_batch_size, "eval.micro_batch_size")
    _positive(r.eval.every_steps, "eval.every_steps", allow_zero=True)
    _positive(r.checkpoint.every_steps, "checkpoint.every_steps", allow_zero=True)
    _positive(r.checkpoint.keep_last, "checkpoint.keep_last", allow_zero=True)
    _positive(r.logging.progress_interval_s, "logging.progress_interval_s", allow_zero=True)
    if r.logging.wandb is not None:
        _choice(r.logging.wandb.mode, ("offline", "online"), "logging.wandb.mode")
    _positive(r.debug.step_delay_s, "debug.step_delay_s", allow_zero=True)
    _validate_words(r)


def _validate_words(r: Recipe) -> None:
    """``train.max_words_seen`` and ``checkpoint.milestones_words`` parse (see :mod:`antlm_dist.words`)."""
    from antlm_dist.words import Milestones, parse_word_count  # local: words imports nothing from here

    try:
        if r.train.max_words_seen is not None:
            parse_word_count(r.train.max_words_seen, "train.max_words_seen")
        Milestones.parse(r.checkpoint.milestones_words)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _positive(r.debug.fault_phase_rank, "debug.fault_phase_rank", allow_zero=True)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (saved with every run and checkpoint)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


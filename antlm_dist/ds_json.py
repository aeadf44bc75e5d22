"""The DeepSpeed JSON, read and checked against the recipe without importing torch.

The recipe owns batch sizes, clipping and precision; the JSON owns the ZeRO stage, offload
and communication. This module finds the file (a path, or a name in the shipped
``ds_configs/``), parses it, checks the ZeRO stage and refuses a ``scheduler`` section, and
fills (or checks) the batch and clipping fields. It imports no torch, so the launcher's
preflight reports a broken JSON within a fraction of a second;
:func:`antlm_dist.distributed.build_ds_config` adds the precision fields, which depend on
the device.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from antlm_dist.config import ConfigError, Recipe


def resolve_ds_config_path(name_or_path: str) -> Path:
    """A path, or a file name in the shipped ``ds_configs/``.

    Raises:
        ConfigError: neither exists.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = resources.files("antlm_dist.ds_configs") / p.name
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(x.name for x in resources.files("antlm_dist.ds_configs").iterdir() if x.name.endswith(".json"))
    raise ConfigError(
        f"distributed.deepspeed_config={name_or_path!r}: no such file; shipped configs: {', '.join(names)}"
    )


def read_ds_json(recipe: Recipe, world_size: int, recipe_source: str = "the recipe") -> tuple[Path, dict]:
    """``(path, config)``: the recipe's DeepSpeed JSON with its batch and clipping fields
    filled from the recipe (``"auto"``) or checked against it.

    Raises:
        ConfigError: no such file, invalid JSON, a ZeRO stage other than 0–3, a ``scheduler``
            section, or a concrete batch/clipping value that contradicts the recipe (naming
            the JSON file, the recipe and both values).
    """
    path = resolve_ds_config_path(recipe.distributed.deepspeed_config)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object ({{...}}), not {type(cfg).__name__}")
    _check_zero_stage(cfg, path)
    if "scheduler" in cfg:
        raise ConfigError(
            f"{path} has a \"scheduler\" section; the LR schedule comes from the recipe "
            "(train.lr, train.warmup_steps, train.min_lr_ratio): remove that section"
        )
    t = recipe.train
    wanted = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (t.micro_batch_size * t.gradient_accumulation_steps * world_size,
                             f"train.micro_batch_size × train.gradient_accumulation_steps × world size {world_size}"),
        "gradient_clipping": (t.grad_clip, "train.grad_clip"),
    }
    for key, (value, field) in wanted.items():
        have = cfg.get(key, "auto")
        if have == "auto":
            cfg[key] = value
        elif have != value:
            raise ConfigError(
                f"{path} sets {key}={have} but {recipe_source} gives {field} = {value}; set "
                f"{key} to \"auto\" in {path.name} (batch sizes and clipping belong in the recipe) "
                "or change the recipe to match"
            )
    return path, cfg


def _check_zero_stage(cfg: dict, path: Path) -> None:
    """ZeRO (Rajbhandari et al. 2020) has stages 0-3; DeepSpeed itself fails on another value
    only after the model is built, with a traceback.

    Raises:
        ConfigError: naming the JSON file, the value and the allowed stages.
    """
    section = cfg.get("zero_optimization", {})
    stage = section.get("stage", 0) if isinstance(section, dict) else section
    if not isinstance(section, dict) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"{path} sets zero_optimization.stage={stage!r}; ZeRO stages are 0, 1, 2 and 3: set one of them "
            "in that file, or name a shipped config with distributed.deepspeed_config=zero2.json"
        )

"""A DeepSpeed checkpoint of any ZeRO stage and world size → a Hugging Face folder (the
library behind ``antlm-export``, whose command line is :mod:`antlm_dist.export_cli`).

The exported folder loads offline through ``AutoModelForCausalLM``, ``AutoModelForMaskedLM``,
``AutoModel`` and ``AutoModelForSequenceClassification`` with ``trust_remote_code=True``
(:mod:`antlm_dist.model.hf_auto` gives the mask and output of each), through
``AutoTokenizer.from_pretrained``, and back into our own model with :func:`load_pretrained`
(for continued training or scoring)::

    <out>/config.json              HF config + ``auto_map`` + ``mlm_target`` + ``antlm`` (schedule, step,
                                   version, recipe, tokenizer hash)
    <out>/hf_auto.py               the model code ``auto_map`` points to (it imports antlm_dist)
    <out>/generation_config.json   bos/eos/pad ids of the run's tokenizer (llama)
    <out>/model.safetensors        fp32 weights, the trainer's (= HF Llama) parameter names
    <out>/tokenizer.json, tokenizer_config.json   pad, bos, eos, unk and mask tokens declared

``mlm_target`` is the recipe's ``objective.mlm_target``: ``same_position`` (BERT-style MLM:
a masked token is scored where it stands, the BabyLM 2025 pipeline's ``mlm`` backend) or
``next_position`` (MNTP: token i is scored at position i-1, its ``mntp`` backend). Every
recipe with CLM phases also scores with the ``causal`` backend.

Weights: ZeRO keeps fp32 master weights partitioned over ranks (in the optimizer state
files); DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` merges them on CPU,
without a process group, whatever the training world size. Checkpoints saved without
ZeRO partitioning (no ``*optim_states.pt`` with flat fp32 groups) are read from the
module state in ``mp_rank_00_model_states.pt``.

``--untrained`` writes the same recipe and tokenizer with freshly initialised weights
(the trainer's initialisation: :func:`antlm_dist.seeding.seed_model_init` for rank 0, then
``build_model``), recorded as step 0: the baseline for zero-shot evaluations.

Backbones: ``llama`` (``model_type: llama``: without ``trust_remote_code``, HF's own
``LlamaForCausalLM`` loads it too) and ``ltg_bert`` (``model_type: antlm_ltg_bert``).
:data:`HF_CONFIG_BUILDERS` and :data:`antlm_dist.model.hf_auto.AUTO_CLASSES` are the places
to add another backbone.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from antlm_dist import __version__
from antlm_dist.config import ModelConfig, Recipe, recipe_from_dict
from antlm_dist.words import milestone_name

if TYPE_CHECKING:  # torch and the checkpoint module are imported where used: ``--help`` must not wait for them
    import torch

    from antlm_dist.checkpoint import ClientState

log = logging.getLogger("antlm_dist")

ANTLM_CONFIG_KEY = "antlm"
"""Key in ``config.json`` under which the AntLM metadata is stored (a dict)."""
MLM_TARGET_KEY = "mlm_target"
"""Key in ``config.json``: the recipe's ``objective.mlm_target`` (``same_position`` or ``next_position``)."""


class ExportError(ValueError):
    """The checkpoint or the output folder cannot be used for an export."""


# ----------------------------------------------------------------------------- finding the checkpoint

def resolve_checkpoint(path: Path | str) -> tuple[Path, str, Path]:
    """Resolve a run folder, its ``checkpoints/`` folder or one tag folder
    (:func:`antlm_dist.checkpoint.resolve_checkpoint`).

    Returns:
        (checkpoints folder, tag, run folder). The run folder holds ``tokenizer/``.

    Raises:
        ExportError: the path does not exist, or holds no complete checkpoint.
    """
    from antlm_dist import checkpoint as ckpt

    try:
        ref = ckpt.resolve_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc)) from exc
    return ref.ckpt_dir, ref.tag, ref.run_dir


def read_checkpoint_state(ckpt_dir: Path, tag: str) -> ClientState:
    """The trainer's client state of one tag (:func:`antlm_dist.checkpoint.read_client_state`).

    Raises:
        ExportError: missing, or without the fields the export needs.
    """
    from antlm_dist import checkpoint as ckpt

    try:
        return ckpt.read_client_state(ckpt_dir, tag)[1]
    except ckpt.CheckpointError as exc:
        raise ExportError(str(exc)) from exc


def consolidate_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 full weights of one tag, merged over ranks, on CPU.

    Returns:
        {parameter name: fp32 tensor}, HF Llama names (``model.embed_tokens.weight`` …).

    Raises:
        ExportError: DeepSpeed's files are missing or unreadable.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(ckpt_dir) / tag
    if any(tag_dir.glob("*optim_states.pt")):
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises assorted types
            raise ExportError(f"could not merge the ZeRO checkpoint {tag_dir}: {exc}") from exc
    else:  # saved without ZeRO partitioning: the module state is complete on rank 0
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ExportError(f"{tag_dir} holds neither *optim_states.pt nor mp_rank_*_model_states.pt")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}


# ----------------------------------------------------------------------------- HF config per architecture

def _llama_hf_config(m: ModelConfig, tok):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads or m.num_attention_heads, hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings, initializer_range=m.initializer_range,
        rms_norm_eps=m.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _llama_hf_model(cfg):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(cfg)


def _ltg_bert_hf_config(m: ModelConfig, tok):
    from antlm_dist.model.hf_auto import hf_config_from_model_config

    return hf_config_from_model_config(m, tok)


def _ltg_bert_hf_model(cfg):
    from antlm_dist.model.hf_auto import LtgBertHFForMaskedLM

    return LtgBertHFForMaskedLM(cfg)


HF_CONFIG_BUILDERS = {"llama": (_llama_hf_config, _llama_hf_model),
                      "ltg_bert": (_ltg_bert_hf_config, _ltg_bert_hf_model)}
"""``model.arch`` → (build the HF config from (ModelConfig, tokenizer), build the HF model from it)."""


def _builders(arch: str):
    if arch not in HF_CONFIG_BUILDERS:
        raise ValueError(
            f"model.arch={arch!r} cannot be exported to a Hugging Face folder yet; supported: "
            f"{', '.join(sorted(HF_CONFIG_BUILDERS))}"
        )
    return HF_CONFIG_BUILDERS[arch]


# ----------------------------------------------------------------------------- writing

def write_hf_folder(out: Path, recipe: Recipe, state_dict: dict[str, torch.Tensor], tokenizer_dir: Path,
                    meta: dict, *, overwrite: bool = False) -> Path:
    """Write config, fp32 safetensors weights, generation config, tokenizer and the model code
    (``hf_auto.py``, named by the config's ``auto_map``) into ``out``; ``config.json`` also gets
    ``mlm_target`` (the recipe's ``objective.mlm_target``).

    Args:
        out: the folder to create (must be absent or empty unless ``overwrite``).
        recipe: the run's recipe; ``recipe.model`` gives the architecture.
        state_dict: {name: fp32 tensor} with our (= HF Llama) parameter names.
        tokenizer_dir: a folder holding the run's ``tokenizer.json``.
        meta: extra AntLM metadata stored in ``config.json`` under ``antlm`` (step,
            schedule, …); the version, tokenizer hash and recipe are added here.

    Returns:
        ``out``.

    Raises:
        ExportError: ``out`` holds files and ``overwrite`` is False, or the weights do not
            match the architecture (missing/unexpected names or shapes).
        ValueError: an architecture without an HF mapping.
    """
    from transformers import GenerationConfig

    from antlm_dist.data.tokenizer import check_vocab_matches, load_tokenizer, tokenizer_hash
    from antlm_dist.model import hf_auto

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out} is not empty; pass --overwrite or choose another folder")
        shutil.rmtree(out)
    build_config, build_model = _builders(recipe.model.arch)
    tok = load_tokenizer(tokenizer_dir)
    check_vocab_matches(tok, recipe.model.vocab_size, str(tokenizer_dir))
    config = build_config(recipe.model, tok)
    setattr(config, ANTLM_CONFIG_KEY, {
        "antlm_dist_version": __version__, "arch": recipe.model.arch,
        "tokenizer_hash": tokenizer_hash(Path(tokenizer_dir) / "tokenizer.json"
                                         if Path(tokenizer_dir).is_dir() else tokenizer_dir),
        MLM_TARGET_KEY: recipe.objective.mlm_target, **meta, "recipe": recipe.to_dict(),
    })
    setattr(config, MLM_TARGET_KEY, recipe.objective.mlm_target)  # top level: read by backend choosers
    config.auto_map = hf_auto.auto_map(recipe.model.arch)
    hf_model = build_model(config)
    try:
        hf_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"the checkpoint's weights do not fit model.arch={recipe.model.arch}: {exc}") from exc
    hf_model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                  pad_token_id=tok.pad_token_id)
    tok.model_max_length = recipe.model.max_position_embeddings
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    shutil.copyfile(hf_auto.__file__, out / Path(hf_auto.__file__).name)  # the code auto_map names
    tok.save_pretrained(str(out))
    _follow_umask(out)
    return out


def _follow_umask(folder: Path) -> None:
    """Give every file in ``folder`` the mode a plain ``open()`` gives (0666 less the umask).

    ``save_pretrained`` writes ``model.safetensors`` through a private temporary file, which
    leaves it 0600: other users of a shared model folder could not read the weights.
    """
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; put it straight back
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def export_checkpoint(checkpoint: Path | str, out: Path | str, *, overwrite: bool = False,
                      untrained: bool = False) -> Path:
    """Export one trained checkpoint (or, with ``untrained``, its freshly initialised twin).

    Args:
        checkpoint: see :func:`resolve_checkpoint`.
        out: the HF folder to write.
        untrained: same recipe and tokenizer, weights from the trainer's initialisation
            (:func:`antlm_dist.seeding.seed_model_init`, rank 0), recorded as step 0.

    Returns:
        ``out``.

    Raises:
        ExportError: see :func:`resolve_checkpoint`, :func:`write_hf_folder`; also when
            the run's tokenizer differs from the one the checkpoint recorded.
    """
    from antlm_dist.data.tokenizer import tokenizer_hash
    from antlm_dist.model import build_model
    from antlm_dist.seeding import seed_model_init

    ckpt_dir, tag, run_dir = resolve_checkpoint(checkpoint)
    state = read_checkpoint_state(ckpt_dir, tag)
    recipe = recipe_from_dict(state.recipe)
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise ExportError(f"{tok_dir}/tokenizer.json is missing; the export needs the run's tokenizer folder")
    recorded = state.tokenizer_hash
    if recorded and tokenizer_hash(tok_dir / "tokenizer.json") != recorded:
        raise ExportError(f"{tok_dir} is not the tokenizer checkpoint {tag} was trained with (hash differs)")
    meta = {"schedule": state.schedule, "step": int(state.step), "source_checkpoint": str(ckpt_dir / tag),
            "world_size": state.world_size, "untrained": untrained}
    if untrained:
        seed_model_init(recipe.train.seed, rank=0)  # the trainer's rank-0 initialisation
        sd = {k: v.detach().float() for k, v in build_model(recipe.model).state_dict().items()}
        meta["step"] = 0
    else:
        sd = consolidate_state_dict(ckpt_dir, tag)
    meta["words_seen"] = 0 if untrained else state.words_seen  # None: written before words were counted
    return write_hf_folder(Path(out), recipe, sd, tok_dir, meta, overwrite=overwrite)


# ----------------------------------------------------------------------------- milestones

def export_milestones(tag_dir: Path, hf_dir: Path, milestones: list[int]) -> list[dict]:
    """Export checkpoint ``tag_dir`` to ``hf_dir/chck_<name>`` for each milestone (rank 0 only).

    The export is :func:`antlm_dist.export.export_checkpoint` (what ``antlm-export`` runs: the
    ZeRO shards of any stage merged to fp32) into ``chck_<name>.tmp``, renamed into place when
    complete; further milestones reached by the same step get a copy of that folder. It runs in
    this process: as ``antlm-export`` in a subprocess, re-importing torch, DeepSpeed and
    transformers took 30-40 s of the other ranks' waiting. Building the HF model draws from
    torch's random generator, so the export runs under ``torch.random.fork_rng``: the
    training's random stream is the same with or without milestones.

    Returns:
        One record per milestone: ``{"milestone", "path"}``, or ``{"milestone", "error"}``
        when the export failed (logged with the command that retries it; training goes on).
    """
    import torch

    records, first = [], None
    for words in milestones:
        final = Path(hf_dir) / f"chck_{milestone_name(words)}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if first is None:
            try:
                with torch.random.fork_rng(devices=[]):
                    export_checkpoint(tag_dir, tmp, overwrite=True)
            except Exception as exc:  # noqa: BLE001 - any failure is reported, and training goes on
                shutil.rmtree(tmp, ignore_errors=True)
                error = f"{type(exc).__name__}: {exc}"
                log.error("the export for milestone %d words failed; retry with: antlm-export --checkpoint %s "
                          "--out %s\n%s", words, tag_dir, final, error)
                return records + [{"milestone": words, "error": error}]
        else:
            shutil.copytree(first, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        first = first or final
        log.info("milestone %s words: exported %s to %s", f"{words:,}", tag_dir.name, final)
        records.append({"milestone": words, "path": str(final)})
    return records


# ----------------------------------------------------------------------------- loading back

def read_antlm_meta(folder: Path | str) -> dict:
    """The ``antlm`` block of an exported ``config.json`` ({} for a plain HF folder).

    Raises:
        ExportError: ``config.json`` is missing.
    """
    return _read_hf_config(folder).get(ANTLM_CONFIG_KEY) or {}


def _read_hf_config(folder: Path | str) -> dict:
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise ExportError(f"{folder}: no config.json; give a folder written by antlm-export")
    return json.loads(f.read_text())


def load_pretrained(folder: Path | str, device: str | torch.device = "cpu"):
    """Load an exported folder into our model, in eval mode, fp32.

    Args:
        folder: written by :func:`write_hf_folder` (or a plain HF Llama folder with a
            tokenizer that has ``<pad> <s> </s> <unk> <mask>``).
        device: where to put the model.

    Returns:
        (the trainer's model: :class:`~antlm_dist.model.llama.AntLMForPretraining` or
        :class:`~antlm_dist.model.ltg_bert.LtgBertForPretraining`, ``PreTrainedTokenizerFast``).
        The model's ``forward(input_ids, attention_mask, labels=None, *, causal)`` serves
        both the causal and the bidirectional mask.

    Raises:
        ExportError: no ``config.json``, ``model.safetensors`` or ``tokenizer.json``.
        ValueError: an architecture without an entry in :data:`HF_CONFIG_BUILDERS`.
        TokenizerError: the tokenizer lacks a special token or mismatches the vocabulary.
    """
    from safetensors.torch import load_file

    from antlm_dist.data.tokenizer import check_vocab_matches, load_tokenizer
    from antlm_dist.model import build_model

    folder = Path(folder)
    hf_cfg = _read_hf_config(folder)
    meta = hf_cfg.get(ANTLM_CONFIG_KEY) or {}
    if "recipe" in meta:
        model_cfg = recipe_from_dict(meta["recipe"]).model
    elif hf_cfg.get("model_type") == "llama":
        from antlm_dist.model.hf_auto import llama_model_config

        model_cfg = llama_model_config(hf_cfg)
    else:
        raise ValueError(f"{folder}: model_type={hf_cfg.get('model_type')!r} is not supported; export a llama run")
    if model_cfg.arch not in HF_CONFIG_BUILDERS:
        raise ValueError(f"{folder}: model.arch={model_cfg.arch!r} cannot be loaded here yet; "
                         f"supported: {', '.join(sorted(HF_CONFIG_BUILDERS))}")
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{folder} has no tokenizer.json; export the model with antlm-export, which copies the run's tokenizer")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{folder} has no model.safetensors")
    tok = load_tokenizer(folder)
    check_vocab_matches(tok, model_cfg.vocab_size, str(folder))
    model = build_model(model_cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), tok

"""Hugging Face classes of both backbones for every Auto class the BabyLM 2025 pipeline loads.

An exported folder (:func:`antlm_dist.export.write_hf_folder`) carries a copy of this
file and an ``auto_map`` in ``config.json``, so with ``trust_remote_code=True`` (offline
too; the copy imports ``antlm_dist``, which must be installed) it loads as:

===================================== ============================ ==========================
Auto class                            mask by default              output
===================================== ============================ ==========================
``AutoModelForCausalLM``              causal                       logits (B, T, V), fp32
``AutoModelForMaskedLM``              bidirectional                logits (B, T, V)
``AutoModel``                         bidirectional                ``last_hidden_state`` (B, T, H)
``AutoModelForSequenceClassification`` bidirectional, mean-pooled  logits (B, num_labels)
===================================== ============================ ==========================

All four hold the very modules of the trainer's model
(:class:`~antlm_dist.model.llama.AntLMForPretraining` or
:class:`~antlm_dist.model.ltg_bert.LtgBertForPretraining`) under the trainer's parameter
names, run the trainer's own forward code, and take ``causal: bool`` to override the
default mask (AntLM trains one set of weights under both masks, Yu et al., BabyLM 2024).
The sequence-classification head (``score``, (num_labels, H), N(0, 0.02)) is new; the
body loads from the folder.

Llama folders keep ``model_type: llama`` (``LlamaConfig``), so without
``trust_remote_code`` ``AutoModelForCausalLM`` gives HF's own ``LlamaForCausalLM`` with
the same logits; LTG-BERT folders have ``model_type: antlm_ltg_bert``
(:class:`LtgBertHFConfig`), registered on import of this module.

``labels``: ``AutoModelForCausalLM`` follows HF's convention (unshifted: the loss compares
``logits[:, :-1]`` with ``labels[:, 1:]``); ``AutoModelForMaskedLM`` compares position t
with ``labels[:, t]``; both ignore -100 and return the mean cross-entropy in nats.
``AutoModelForSequenceClassification`` takes labels (B,) int64 (cross-entropy) or, with
``num_labels == 1``, (B,) float (mean squared error).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification, LlamaConfig, PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import (BaseModelOutput, CausalLMOutputWithPast, MaskedLMOutput,
                                           SequenceClassifierOutput)

from antlm_dist.config import ModelConfig, recipe_from_dict

IGNORE_INDEX = -100
"""Label value that contributes no loss (HF and the trainer agree)."""
LTG_BERT_MODEL_TYPE = "antlm_ltg_bert"
ANTLM_CONFIG_KEY = "antlm"
"""Key in ``config.json`` under which the AntLM metadata is stored (a dict)."""
_LTG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "position_bucket_size", "max_relative_positions", "hidden_dropout",
               "attention_dropout", "layer_norm_eps", "attention")


class LtgBertHFConfig(PretrainedConfig):
    """The :class:`~antlm_dist.config.ModelConfig` fields of an ``ltg_bert`` model, as an HF config.

    The word embedding is the output projection by construction (one module), so HF's
    weight-tying machinery is not involved: ``tie_word_embeddings`` is False.
    """

    model_type = LTG_BERT_MODEL_TYPE

    def __init__(self, vocab_size: int = 16384, hidden_size: int = 768, intermediate_size: int = 2048,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12, max_position_embeddings: int = 512,
                 position_bucket_size: int = 32, max_relative_positions: int = 512, hidden_dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-7, attention: str = "sdpa", **kwargs):
        kwargs["tie_word_embeddings"] = False
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.position_bucket_size = position_bucket_size
        self.max_relative_positions = max_relative_positions
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.attention = attention
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, m: ModelConfig, **kwargs) -> "LtgBertHFConfig":
        attention = "eager" if m.attention == "eager" else "sdpa"
        fields = {f: getattr(m, f) for f in _LTG_FIELDS if f != "attention"}
        return cls(**fields, attention=attention, **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(arch="ltg_bert", loss="torch", **{f: getattr(self, f) for f in _LTG_FIELDS})


def llama_model_config(cfg: dict) -> ModelConfig:
    """A ModelConfig from HF Llama ``config.json`` fields (for folders without AntLM metadata)."""
    rope = cfg.get("rope_parameters") or {}
    return ModelConfig(
        arch="llama", vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg.get("num_key_value_heads"),
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        initializer_range=cfg.get("initializer_range", 0.02),
    )


def trainer_model_config(config: PretrainedConfig) -> ModelConfig:
    """The trainer's ModelConfig of an HF config, with kernels that run anywhere.

    The recipe stored under ``antlm`` wins; otherwise the HF fields are read. Attention is
    ``sdpa`` (``eager`` stays ``eager``) and the loss ``torch``: the Triton kernels are for
    training, and an exported folder must load on any device.
    """
    if isinstance(config, LtgBertHFConfig):
        m = config.to_model_config()
    else:
        meta = getattr(config, ANTLM_CONFIG_KEY, None) or {}
        m = recipe_from_dict(meta["recipe"]).model if "recipe" in meta else llama_model_config(config.to_dict())
    return dataclasses.replace(m, attention="eager" if m.attention == "eager" else "sdpa", loss="torch")


def _hidden_states(core: nn.Module, input_ids, attention_mask, causal: bool) -> torch.Tensor:
    """The trainer model's last hidden states (B, T, H) under the causal or bidirectional mask."""
    if hasattr(core, "encode"):  # LTG-BERT
        return core.encode(input_ids, attention_mask, causal=causal)
    return core.model(input_ids, attention_mask, causal=causal)  # Llama backbone


class _AntLMPreTrained(PreTrainedModel):
    """Holds the modules ``KEEP`` of a freshly built trainer model (see the module docstring).

    The trainer model itself is kept outside the module tree (``_core``), so its forward
    code runs on these very modules and its unused parts (the LM head of ``AutoModel``)
    add no parameters.
    """

    KEEP: tuple[str, ...] = ()
    DEFAULT_CAUSAL = False
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        from antlm_dist.model import build_model

        core = build_model(trainer_model_config(config), "cpu")
        for name in self.KEEP:
            setattr(self, name, getattr(core, name))
        object.__setattr__(self, "_core", core)  # not a submodule: no duplicate parameters
        self._add_head(config)
        self.post_init()

    def _add_head(self, config) -> None:
        """Task heads that are not part of the trainer model (sequence classification)."""

    def _init_weights(self, module):
        """The kept modules come initialised (trainer) or from the folder; only a new head is drawn."""
        if module is getattr(self, "score", None):
            module.weight.data.normal_(0.0, getattr(self.config, "initializer_range", 0.02))

    def _causal(self, causal: bool | None) -> bool:
        return self.DEFAULT_CAUSAL if causal is None else bool(causal)

    def get_input_embeddings(self):
        core = self._core
        return core.embedding.word_embedding if hasattr(core, "embedding") else core.model.embed_tokens


class _LMMixin:
    """``forward(input_ids (B, T) int64, attention_mask (B, T) 1 = real token, labels, causal)``."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, causal: bool | None = None, return_dict: bool | None = None,
                **kwargs):
        causal = self._causal(causal)
        logits = self._core(input_ids, attention_mask, causal=causal)  # (B, T, V)
        loss = None
        if labels is not None:
            if self.SHIFT_LABELS:  # HF causal convention: labels are the inputs, shifted here
                logits_l, labels = logits[:, :-1], labels[:, 1:]
            else:
                logits_l = logits
            loss = nn.functional.cross_entropy(logits_l.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=IGNORE_INDEX)
        return self.OUTPUT(loss=loss, logits=logits)

    def get_output_embeddings(self):
        return None  # the projection is the trainer's module (LTG-BERT: the tied word embedding)


class _CausalLM(_LMMixin, _AntLMPreTrained):
    DEFAULT_CAUSAL = True
    SHIFT_LABELS = True
    OUTPUT = CausalLMOutputWithPast


class _MaskedLM(_LMMixin, _AntLMPreTrained):
    SHIFT_LABELS = False
    OUTPUT = MaskedLMOutput


class _Model(_AntLMPreTrained):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal: bool | None = None, return_dict: bool | None = None, **kwargs) -> BaseModelOutput:
        """``last_hidden_state`` (B, T, H) in the parameters' dtype."""
        return BaseModelOutput(last_hidden_state=_hidden_states(self._core, input_ids, attention_mask,
                                                                self._causal(causal)))


class _SequenceClassification(_AntLMPreTrained):
    def _add_head(self, config) -> None:
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, causal: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> SequenceClassifierOutput:
        """logits (B, num_labels) from the mean of the real tokens' last hidden states."""
        hidden = _hidden_states(self._core, input_ids, attention_mask, self._causal(causal))  # (B, T, H)
        keep = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(hidden.dtype)[..., None]
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, H)
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


_BACKBONES = {  # arch: (config class, base_model_prefix, body modules, LM head modules, class-name stem)
    "llama": (LlamaConfig, "model", ("model",), ("lm_head",), "AntLMLlama"),
    "ltg_bert": (LtgBertHFConfig, "ltg_bert", ("embedding", "transformer"), ("classifier",), "LtgBertHF"),
}
_TASKS = {  # Auto class: (base class, class-name suffix, keeps the LM head)
    "AutoModelForCausalLM": (_CausalLM, "ForCausalLM", True),
    "AutoModelForMaskedLM": (_MaskedLM, "ForMaskedLM", True),
    "AutoModel": (_Model, "Model", False),
    "AutoModelForSequenceClassification": (_SequenceClassification, "ForSequenceClassification", False),
}


def _define_classes() -> dict[str, dict[str, type]]:
    """One module-level class per (backbone, Auto class), e.g. ``AntLMLlamaForMaskedLM`` or
    ``LtgBertHFModel``: ``auto_map`` names them, and HF checks ``config_class`` by name."""
    out: dict[str, dict[str, type]] = {}
    for arch, (config_class, prefix, body, head, stem) in _BACKBONES.items():
        out[arch] = {}
        for auto_name, (base, suffix, with_head) in _TASKS.items():
            cls = type(stem + suffix, (base,), {"config_class": config_class, "base_model_prefix": prefix,
                                                "KEEP": body + (head if with_head else ()), "__module__": __name__})
            globals()[cls.__name__] = cls
            out[arch][auto_name] = cls
    return out


AUTO_CLASSES = _define_classes()
"""``model.arch`` → Auto class name → the class this module gives it: ``AntLMLlama{ForCausalLM,
ForMaskedLM, Model, ForSequenceClassification}`` and ``LtgBertHF{…}``."""
LtgBertHFForMaskedLM = AUTO_CLASSES["ltg_bert"]["AutoModelForMaskedLM"]  # named here for importers

# LTG-BERT has no HF implementation: register ours, so the Auto classes work in-process
# without trust_remote_code. Llama is not registered: HF's own Llama classes stay the
# default for every llama folder of the process.
AutoConfig.register(LTG_BERT_MODEL_TYPE, LtgBertHFConfig, exist_ok=True)
for _auto in (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel, AutoModelForSequenceClassification):
    _auto.register(LtgBertHFConfig, AUTO_CLASSES["ltg_bert"][_auto.__name__], exist_ok=True)


def auto_map(arch: str) -> dict[str, str]:
    """The ``config.json`` ``auto_map`` of an ``arch`` folder holding a copy of this file.

    Raises:
        KeyError: an ``arch`` without classes here.
    """
    module = __name__.rsplit(".", 1)[-1]
    out = {name: f"{module}.{cls.__name__}" for name, cls in AUTO_CLASSES[arch].items()}
    if arch == "ltg_bert":
        out["AutoConfig"] = f"{module}.{LtgBertHFConfig.__name__}"
    return out


def hf_config_from_model_config(m: ModelConfig, tok) -> LtgBertHFConfig:
    """The HF config of an ``ltg_bert`` ModelConfig with the tokenizer's special ids."""
    cfg = LtgBertHFConfig.from_model_config(
        m, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg.architectures = ["LtgBertHFForMaskedLM"]
    return cfg

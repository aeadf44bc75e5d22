"""Hugging Face wrapper of the LTG-BERT backbone, and its export to an HF folder.

:class:`LtgBertHFConfig` (``model_type: antlm_ltg_bert``) and
:class:`LtgBertHFForMaskedLM` hold the very modules of
:class:`~antlm_dist.model.ltg_bert.LtgBertForPretraining` under the same parameter names
(``embedding.*``, ``transformer.*``, ``classifier.*``), so a trainer state dict loads
strictly, and the forward reuses the trainer model's code.

An exported folder loads offline in two ways:

* ``AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`` in any process
  where ``antlm_dist`` is installed: ``config.json`` carries an ``auto_map`` to this module,
  copied into the folder by ``save_pretrained``;
* after ``import antlm_dist.model.ltg_bert_hf``, which registers both classes with
  ``AutoConfig``/``AutoModelForMaskedLM``, without ``trust_remote_code``.

``forward(input_ids, attention_mask=None, labels=None, causal=False)`` returns a
``MaskedLMOutput`` with logits (B, T, V) for every position; ``causal=True`` gives the
CLM-mode logits (position t predicts token t+1). ``labels`` follow the trainer's
convention (aligned to positions, -100 = no loss); the loss is their mean cross-entropy.
"""
from __future__ import annotations


import torch
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from antlm_dist.config import ModelConfig
from antlm_dist.kernels.masked_token_loss import IGNORE_INDEX
from antlm_dist.model.ltg_bert import LtgBertForPretraining

MODEL_TYPE = "antlm_ltg_bert"
_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "position_bucket_size", "max_relative_positions", "hidden_dropout",
                 "attention_dropout", "layer_norm_eps", "attention")


class LtgBertHFConfig(PretrainedConfig):
    """The :class:`~antlm_dist.config.ModelConfig` fields of an ``ltg_bert`` model, as an HF config.

    The word embedding is the output projection by construction (one module), so HF's
    weight-tying machinery is not involved: ``tie_word_embeddings`` is False.
    """

    model_type = MODEL_TYPE

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
        fields = {f: getattr(m, f) for f in _MODEL_FIELDS if f != "attention"}
        return cls(**fields, attention=attention, **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(arch="ltg_bert", loss="torch", **{f: getattr(self, f) for f in _MODEL_FIELDS})


class LtgBertHFForMaskedLM(PreTrainedModel):
    """LTG-BERT with its tied MLM head, loadable with ``from_pretrained`` (see the module docstring)."""

    config_class = LtgBertHFConfig
    base_model_prefix = "ltg_bert"
    main_input_name = "input_ids"
    _no_split_modules = ["LtgBertLayer"]

    def __init__(self, config: LtgBertHFConfig):
        super().__init__(config)
        core = LtgBertForPretraining(config.to_model_config())
        self.embedding = core.embedding
        self.transformer = core.transformer
        self.classifier = core.classifier
        self.attention_impl = core.attention_impl
        self._index_cache = {}
        self.post_init()

    # The trainer model's code, run on these same modules (the HF config has the fields it reads).
    position_index = LtgBertForPretraining.position_index
    encode = LtgBertForPretraining.encode

    def _init_weights(self, module):
        """Weights come from LtgBertForPretraining's own initialisation or from a checkpoint."""

    def get_input_embeddings(self):
        return self.embedding.word_embedding

    def get_output_embeddings(self):
        return None  # the input embedding is the output projection (one module)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, causal: bool = False, segment_ids: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> MaskedLMOutput:
        hidden = self.encode(input_ids, attention_mask, causal=causal, segment_ids=segment_ids)
        logits = self.embedding.word_embedding(hidden=self.classifier(hidden))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return MaskedLMOutput(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, LtgBertHFConfig, exist_ok=True)
AutoModelForMaskedLM.register(LtgBertHFConfig, LtgBertHFForMaskedLM, exist_ok=True)
LtgBertHFConfig.register_for_auto_class()
LtgBertHFForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")


def hf_config_from_model_config(m: ModelConfig, tok) -> LtgBertHFConfig:
    """The HF config of ``m`` with the tokenizer's special ids (for an export dispatch table)."""
    cfg = LtgBertHFConfig.from_model_config(
        m, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg.architectures = ["LtgBertHFForMaskedLM"]
    return cfg


"""antlm-dist: distributed AntLM pretraining (Yu et al., BabyLM 2024).

One backbone, alternating causal (CLM) and masked (MLM) language-model phases, under
DeepSpeed ZeRO, with Triton kernels for mask-switchable attention and the masked-token loss.
"""
__version__ = "0.1.0"

"""``antlm-bench``: throughput, MFU, memory and energy of the real AntLM training step
against the BabyLlama reference step. The analytic FLOP count it shares with the trainer
lives in :mod:`antlm_dist.telemetry.flops`; nothing outside this package imports it."""

"""``antlm-bench``: throughput, MFU, memory and energy of the real AntLM training step
against the BabyLlama reference step. ``flops`` holds the analytic FLOP count that the
trainer also uses for its ``mfu`` metric."""

"""Training recipes shipped with antlm-dist (installed as ``antlm_dist.recipes``)."""

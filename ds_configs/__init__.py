"""DeepSpeed JSON configs shipped with antlm-dist (installed as ``antlm_dist.ds_configs``)."""

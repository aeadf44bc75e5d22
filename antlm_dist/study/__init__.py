"""``antlm-study``: train, export and score several objective schedules of one recipe.

AntLM's claim (Yu et al., BabyLM 2024) is comparative: at the same number of epochs,
alternating CLM and MLM phases beats either objective alone (+1.0 macro-average on
BabyLlama, +2.2 on LTG-BERT). A study checks it for any recipe: every schedule × seed is
one run with the same model, data, batch and learning-rate schedule, and only
``objective.schedule`` (and ``train.seed``) differ.

Layout of ``--out``::

    study_plan.json                 the settings every run shares (checked on a rerun)
    cache/                          tokenised corpus, shared by the runs
    <schedule>/seed<k>/train/       the antlm-train run folder (checkpoints, metrics.jsonl, …)
    <schedule>/seed<k>/train.log    its stdout and stderr
    <schedule>/seed<k>/export/      the Hugging Face folder (antlm-export)
    <schedule>/seed<k>/blimp_clm.json, blimp_mlm.json   antlm-eval blimp results
    <schedule>/seed<k>/result.json  the run's figures; present only once the run is complete
    study.json, study.md, plots/heldout_loss.png, plots/blimp.png   the report

Modules: :mod:`~antlm_dist.study.plan` (what to run), :mod:`~antlm_dist.study.runner`
(running and resuming one run), :mod:`~antlm_dist.study.report` (tables and plots),
:mod:`~antlm_dist.study.cli` (the command).
"""

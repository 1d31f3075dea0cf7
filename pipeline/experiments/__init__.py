"""Experiments over many runs: the ablation suite, k-fold cross-validation (``cv``, its scores
and report), the comparison report and its plots; and ``export`` of a trained network."""

"""Experiments over many runs: the ablation suite, the comparison report and its plots."""

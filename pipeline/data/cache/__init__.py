"""The memory-mapped volume cache: per-case facts, cases resampled onto a plan's grid, resampling and slicing."""

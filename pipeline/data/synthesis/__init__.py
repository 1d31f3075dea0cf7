"""Generated data sets: 2D phantoms and CT/MR-like phantom volumes."""

"""A run: its identity and directory, its name from the network's knobs, its loggers and its ``summary.json``."""

"""Training: the LightningModule, checkpoint files (the one loader), precision, and the callbacks that keep a run safe (divergence guard, exact resume, SIGTERM)."""

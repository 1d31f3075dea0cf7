"""The plan: the training cases' fingerprint in; target spacing, slice axis, patch, batch and pooling out."""

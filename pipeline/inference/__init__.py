"""Batch inference on new scans (``medseg infer``): Trainer.predict plus a prediction writer.

``checkpoint`` loads a model and its preprocessing safely; ``cases`` finds, names and loads the
inputs; ``predictor`` segments a case; ``postprocess`` and ``writer`` produce the outputs;
``run`` ties them together and is the command.
"""

from __future__ import annotations

from pipeline.inference.run import InferenceResult, infer, infer_command

__all__ = ["InferenceResult", "infer", "infer_command"]

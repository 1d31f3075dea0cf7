"""Batch inference on new scans (``medseg infer``, whose entry is ``pipeline.cli.infer``):
Trainer.predict plus a prediction writer.

``cases`` finds, names and loads the inputs; ``ensemble`` loads one checkpoint or several;
``predictor`` segments a case; ``postprocess`` and ``writer`` produce the outputs; ``run`` ties
them together.
"""

from __future__ import annotations

from pipeline.inference.run import InferenceResult, infer

__all__ = ["InferenceResult", "infer"]

"""Serving a trained network: verified export bundles, the behaviour gate, validation.

Submodules: ``suite`` (the seeded positions every comparison runs on), ``compare``
(``compare_models``, the gate's thresholds), ``validate`` (``validate_model``), ``onnx_export``
(ONNX export and onnxruntime sessions; the ``serve`` extra), ``export`` (``export_model``,
``load_onnx``). The bundle's files are the store's (``keisei_fn.store.bundle``), its weight
encodings ``keisei_fn.quantize``'s.
"""

from keisei_fn.serve.compare import (
    DEFAULT_THRESHOLDS,
    TOP1_MARGIN,
    ComparisonReport,
    Predictor,
    Thresholds,
    compare_models,
)
from keisei_fn.serve.export import ExportResult, export_model, load_onnx
from keisei_fn.serve.suite import SuitePosition, default_suite, suite_positions
from keisei_fn.serve.validate import ValidationReport, validate_model

__all__ = [
    "DEFAULT_THRESHOLDS",
    "TOP1_MARGIN",
    "ComparisonReport",
    "ExportResult",
    "Predictor",
    "SuitePosition",
    "Thresholds",
    "ValidationReport",
    "compare_models",
    "default_suite",
    "export_model",
    "load_onnx",
    "suite_positions",
    "validate_model",
]

"""Weight-only quantization for the engine: int8, int4 (group-wise), nf4 and nf4-dq.

Usage after loading a model: `report = quantize_model(model, QuantConfig.parse("int4"))`."""
from .apply import LayerReport, QuantReport, model_weight_bytes, quantize_model
from .base import QuantLinear
from .calibrate import calibration_windows
from .config import METHODS, QuantConfig, parse_dtype
from .int4 import Int4Linear, on_int4_grid
from .int8 import Int8Linear
from .nf4 import NF4Linear

__all__ = ["METHODS", "QuantConfig", "QuantReport", "LayerReport", "QuantLinear", "Int8Linear", "Int4Linear",
           "NF4Linear", "quantize_model", "model_weight_bytes", "parse_dtype", "on_int4_grid",
           "calibration_windows"]

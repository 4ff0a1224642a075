"""Export armada models for inference without PyTorch: ONNX through optimum, int8 through ORTQuantizer.

    >>> from armada.export import export_onnx
    >>> export_onnx("out/agency", "out/agency_onnx", quantize="int8")
    >>> from armada.onnxruntime import ORTAgencyGPT2ForCausalLM
    >>> ORTAgencyGPT2ForCausalLM.from_pretrained("out/agency_onnx", file_name="model_quantized.onnx").generate(...)

Needs the `onnx` extra (`pip install armada[onnx]`). Importing this package registers the armada ONNX configs with
optimum's `TasksManager`.
"""

from ..compat import require_onnx_export

require_onnx_export()  # one clear line instead of optimum's ModuleNotFoundError

from .onnx_configs import (  # noqa: E402
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    ONNX_CONFIGS,
    AgencyGPT2OnnxConfig,
    ThoughtDiffusionOnnxConfig,
    UnifiedARMTOnnxConfig,
)
from .onnx_export import ExportParityError  # noqa: E402, cpu_instruction_set, export_onnx, quantization_config

__all__ = [
    "export_onnx", "ExportParityError", "cpu_instruction_set", "quantization_config",
    "AgencyGPT2OnnxConfig", "UnifiedARMTOnnxConfig", "ThoughtDiffusionOnnxConfig", "ONNX_CONFIGS", "DEFAULT_OPSET",
    "MIN_OPSET", "MAX_OPSET",
]

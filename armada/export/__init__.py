"""Export armada models for inference without PyTorch: ONNX graphs, dynamic int8, parity checked at every export.

    >>> from armada.export import export_onnx
    >>> export_onnx("out/agency", "out/agency_onnx", quantize="int8")
    >>> from armada.onnxruntime import ORTAgencyGPT2ForCausalLM
    >>> ORTAgencyGPT2ForCausalLM.from_pretrained("out/agency_onnx", file_name="model_quantized.onnx").generate(...)

Needs the `onnx` extra (`pip install armada[onnx]`: onnx and onnxruntime). The graphs (`graphs.py`) are exported
through optimum where optimum-onnx is installed (transformers 4.57; importing this package then registers the
armada ONNX configs with optimum's `TasksManager`) and through `torch.onnx` elsewhere: `onnx_backend()` says which.
"""

from ..compat import require_onnx_export

require_onnx_export()  # one clear line instead of a ModuleNotFoundError

from .graphs import (  # noqa: E402
    DEFAULT_OPSET,
    GRAPHS,
    MAX_OPSET,
    MIN_OPSET,
    AgencyGPT2Graph,
    ThoughtDiffusionGraph,
    UnifiedARMTGraph,
)
from .onnx_export import (  # noqa: E402
    ExportParityError,
    Int8Config,
    cpu_instruction_set,
    export_onnx,
    onnx_backend,
    quantization_config,
    quantize_int8,
)

__all__ = [
    "export_onnx", "ExportParityError", "cpu_instruction_set", "quantization_config", "quantize_int8", "Int8Config",
    "onnx_backend", "GRAPHS", "AgencyGPT2Graph", "UnifiedARMTGraph", "ThoughtDiffusionGraph", "DEFAULT_OPSET",
    "MIN_OPSET", "MAX_OPSET",
]

if onnx_backend() == "optimum":  # registers the OnnxConfigs with optimum's TasksManager
    from .onnx_configs import (  # noqa: E402
        ONNX_CONFIGS,
        AgencyGPT2OnnxConfig,
        ThoughtDiffusionOnnxConfig,
        UnifiedARMTOnnxConfig,
    )

    __all__ += ["AgencyGPT2OnnxConfig", "UnifiedARMTOnnxConfig", "ThoughtDiffusionOnnxConfig", "ONNX_CONFIGS"]

"""optimum ONNX export configurations of the armada architectures, registered with optimum's `TasksManager`.

Thin wrappers of the graphs in `graphs.py` (the one definition of each graph's inputs, outputs, dummy inputs and step
function, shared with the torch backend): `AgencyGPT2OnnxConfig` (`text-generation-with-past`),
`UnifiedARMTOnnxConfig` (the segment step, `commit=True/False`) and `ThoughtDiffusionOnnxConfig` (the denoising
step). Imported only where optimum-onnx is installed (`armada.export.onnx_backend() == "optimum"`).

Importing this module also lets optimum recognize armada's model classes as `transformers` models (optimum infers a
model's library from the module its class lives in, and armada's classes live in `armada.modeling`).
"""

from optimum.exporters.onnx.base import OnnxConfig
from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher
from optimum.exporters.tasks import TasksManager
from optimum.utils import NormalizedTextConfig

from .graphs import DEFAULT_OPSET, AgencyGPT2Graph, ThoughtDiffusionGraph, UnifiedARMTGraph


class GraphModelPatcher(ModelPatcher):
    """While exporting, the model's forward is the graph's step on flat tensors."""

    def __init__(self, config, model, model_kwargs=None):
        super().__init__(config, model, model_kwargs)
        self.patched_forward = config.graph.forward_for(model)


class GraphOnnxConfigMixin:
    """inputs, outputs, dummy inputs and the patched forward of an `OnnxConfig` read from its `graph`."""

    GRAPH_CLASS = None
    DEFAULT_ONNX_OPSET = DEFAULT_OPSET
    ATOL_FOR_VALIDATION = 1e-4
    _MODEL_PATCHER = GraphModelPatcher

    @property
    def graph(self):
        return self.GRAPH_CLASS(self._config)

    @property
    def inputs(self):
        return self.graph.inputs

    @property
    def outputs(self):
        return self.graph.outputs

    def generate_dummy_inputs(self, framework="pt", **kwargs):
        dummy = self.graph.dummy_inputs()
        if framework == "np":  # optimum runs the graph on numpy inputs to fix output shapes it cannot infer
            return {k: [_numpy(t) for t in v] if isinstance(v, list) else _numpy(v) for k, v in dummy.items()}
        return dummy


def _numpy(value):
    return tuple(t.numpy() for t in value) if isinstance(value, tuple) else value.numpy()


class AgencyGPT2OnnxConfig(GraphOnnxConfigMixin, TextDecoderWithPositionIdsOnnxConfig):
    """`AgencyGPT2Graph`: a decoder with past whose cache slots keep their own head counts."""

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig.with_args(num_layers="n_layer", num_attention_heads="n_head")
    GRAPH_CLASS = AgencyGPT2Graph


class UnifiedARMTOnnxConfig(GraphOnnxConfigMixin, OnnxConfig):
    """`UnifiedARMTGraph`: the segment step that commits full segments (`commit=True`) or only appends."""

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig

    def __init__(self, config, task="text-generation", commit=True, **kwargs):
        super().__init__(config, task=task, **kwargs)
        self.commit = commit

    @property
    def graph(self):
        return UnifiedARMTGraph(self._config, commit=self.commit)


class ThoughtDiffusionOnnxConfig(GraphOnnxConfigMixin, OnnxConfig):
    """`ThoughtDiffusionGraph`: the denoising step. `armada.onnxruntime.ORTThoughtDiffusionForMaskedLM` runs
    `generate_with_stack` on it."""

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfig
    GRAPH_CLASS = ThoughtDiffusionGraph


# ----------------------------------------------------------------------------------------------------- registration
ONNX_CONFIGS = {"agency_gpt2": AgencyGPT2OnnxConfig, "unified_armt": UnifiedARMTOnnxConfig,
                "thought_diffusion": ThoughtDiffusionOnnxConfig}
ONNX_TASKS = {"agency_gpt2": "text-generation-with-past", "unified_armt": "text-generation",
              "thought_diffusion": "fill-mask"}


def onnx_config_for(graph):
    """The optimum `OnnxConfig` exporting `graph` (a `graphs.OnnxGraph`) and its optimum task."""
    model_type = graph.config.model_type
    if model_type == "agency_gpt2":
        config = AgencyGPT2OnnxConfig(graph.config, task="text-generation", use_past=True, use_past_in_inputs=True)
    elif model_type == "unified_armt":
        config = UnifiedARMTOnnxConfig(graph.config, commit=graph.commit)
    else:
        config = ONNX_CONFIGS[model_type](graph.config, task=ONNX_TASKS[model_type])
    return config, ONNX_TASKS[model_type]


def _register():
    register = TasksManager.create_register("onnx", overwrite_existing=True)
    register("agency_gpt2", "text-generation", "text-generation-with-past")(AgencyGPT2OnnxConfig)
    register("unified_armt", "text-generation")(UnifiedARMTOnnxConfig)
    register("thought_diffusion", "fill-mask")(ThoughtDiffusionOnnxConfig)

    infer = TasksManager._infer_library_from_model_or_model_class.__func__
    if getattr(infer, "_armada", False):
        return

    def infer_library(cls, model=None, model_class=None):
        target = model_class if model_class is not None else type(model)
        if target is not None and target.__module__.startswith("armada."):
            return "transformers"
        return infer(cls, model=model, model_class=model_class)

    infer_library._armada = True
    TasksManager._infer_library_from_model_or_model_class = classmethod(infer_library)


_register()

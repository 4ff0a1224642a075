"""armada: Agency, Recurrent-Memory And Diffusion Architectures as Hugging Face models.

Importing the package registers every configuration and model with the `transformers` Auto classes, from one
table (`ARCHITECTURES`): each architecture names its config, its base model, and the model it serves for each
Auto class.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .configuration import AgencyGPT2Config, ThoughtDiffusionConfig, UnifiedARMTConfig
from .modeling import (
    AgencyGPT2ForCausalLM,
    AgencyGPT2Model,
    AgencyGPT2PreTrainedModel,
    ThoughtDiffusionForMaskedLM,
    ThoughtDiffusionModel,
    ThoughtDiffusionPreTrainedModel,
    ThoughtStack,
    UnifiedARMTForCausalLM,
    UnifiedARMTMemoryState,
    UnifiedARMTModel,
    UnifiedARMTPreTrainedModel,
)

__version__ = "0.1.0.dev0"

# config class -> {Auto class: model class}. A new architecture adds one row.
ARCHITECTURES = {
    AgencyGPT2Config: {AutoModel: AgencyGPT2Model, AutoModelForCausalLM: AgencyGPT2ForCausalLM},
    UnifiedARMTConfig: {AutoModel: UnifiedARMTModel, AutoModelForCausalLM: UnifiedARMTForCausalLM},
    ThoughtDiffusionConfig: {AutoModel: ThoughtDiffusionModel, AutoModelForMaskedLM: ThoughtDiffusionForMaskedLM},
}


def _register():
    for config_cls, models in ARCHITECTURES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        for auto_cls, model_cls in models.items():
            auto_cls.register(config_cls, model_cls, exist_ok=True)


_register()

__all__ = [
    "ARCHITECTURES",
    "AgencyGPT2Config", "AgencyGPT2Model", "AgencyGPT2ForCausalLM", "AgencyGPT2PreTrainedModel",
    "UnifiedARMTConfig", "UnifiedARMTModel", "UnifiedARMTForCausalLM", "UnifiedARMTPreTrainedModel",
    "UnifiedARMTMemoryState",
    "ThoughtDiffusionConfig", "ThoughtDiffusionModel", "ThoughtDiffusionForMaskedLM", "ThoughtDiffusionPreTrainedModel",
    "ThoughtStack",
]

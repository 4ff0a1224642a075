"""armada: Agency, Recurrent-Memory And Diffusion Architectures as Hugging Face models.

Importing the package registers every configuration and model with the `transformers` Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import AgencyGPT2Config, UnifiedARMTConfig
from .modeling import (
    AgencyGPT2ForCausalLM,
    AgencyGPT2Model,
    AgencyGPT2PreTrainedModel,
    UnifiedARMTForCausalLM,
    UnifiedARMTMemoryState,
    UnifiedARMTModel,
    UnifiedARMTPreTrainedModel,
)

__version__ = "0.1.0.dev0"


def _register():
    for config_cls, base_cls, lm_cls in (
        (AgencyGPT2Config, AgencyGPT2Model, AgencyGPT2ForCausalLM),
        (UnifiedARMTConfig, UnifiedARMTModel, UnifiedARMTForCausalLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


_register()

__all__ = [
    "AgencyGPT2Config", "AgencyGPT2Model", "AgencyGPT2ForCausalLM", "AgencyGPT2PreTrainedModel",
    "UnifiedARMTConfig", "UnifiedARMTModel", "UnifiedARMTForCausalLM", "UnifiedARMTPreTrainedModel",
    "UnifiedARMTMemoryState",
]

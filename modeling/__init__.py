from .modeling_agency_gpt2 import AgencyGPT2ForCausalLM, AgencyGPT2Model, AgencyGPT2PreTrainedModel
from .modeling_thought_diffusion import (
    ThoughtDiffusionForMaskedLM,
    ThoughtDiffusionModel,
    ThoughtDiffusionPreTrainedModel,
    ThoughtStack,
)
from .modeling_unified_armt import (
    UnifiedARMTForCausalLM,
    UnifiedARMTMemoryState,
    UnifiedARMTModel,
    UnifiedARMTPreTrainedModel,
)

__all__ = ["AgencyGPT2Model", "AgencyGPT2ForCausalLM", "AgencyGPT2PreTrainedModel", "UnifiedARMTModel",
           "UnifiedARMTForCausalLM", "UnifiedARMTPreTrainedModel", "UnifiedARMTMemoryState",
           "ThoughtDiffusionModel", "ThoughtDiffusionForMaskedLM", "ThoughtDiffusionPreTrainedModel", "ThoughtStack"]

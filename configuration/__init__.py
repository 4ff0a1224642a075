from .configuration_agency_gpt2 import AGENCY_STATES, OPTIMIZATION_LEVELS, AgencyGPT2Config
from .configuration_thought_diffusion import NOISE_SCHEDULES, ThoughtDiffusionConfig
from .configuration_unified_armt import MEMORY_INITS, UnifiedARMTConfig

__all__ = ["AgencyGPT2Config", "AGENCY_STATES", "OPTIMIZATION_LEVELS", "UnifiedARMTConfig", "MEMORY_INITS",
           "ThoughtDiffusionConfig", "NOISE_SCHEDULES"]

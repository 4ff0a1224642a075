from .configuration_agency_gpt2 import AGENCY_STATES, OPTIMIZATION_LEVELS, AgencyGPT2Config

__all__ = ["AgencyGPT2Config", "AGENCY_STATES", "OPTIMIZATION_LEVELS"]

from .modeling_agency_gpt2 import AgencyGPT2ForCausalLM, AgencyGPT2Model, AgencyGPT2PreTrainedModel

__all__ = ["AgencyGPT2Model", "AgencyGPT2ForCausalLM", "AgencyGPT2PreTrainedModel"]

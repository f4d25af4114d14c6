"""Decoder: Llama-architecture causal LM for pretraining runs, parameter-compatible with `LlamaForCausalLM`."""

from .configuration_decoder import DecoderConfig
from .modeling_decoder import DecoderForCausalLM, DecoderModel, DecoderPreTrainedModel


__all__ = ["DecoderConfig", "DecoderForCausalLM", "DecoderModel", "DecoderPreTrainedModel"]

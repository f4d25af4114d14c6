"""Modern MicroBERT: the ModernBERT architecture as a masked LM for tiny pretraining runs, parameter-compatible with
`ModernBertForMaskedLM` (`model.type: microbert`, `model.architecture: modern`)."""

from .configuration_modern_microbert import ModernMicroBertConfig
from .modeling_modern_microbert import ModernMicroBertForMaskedLM, ModernMicroBertModel, ModernMicroBertPreTrainedModel


__all__ = [
    "ModernMicroBertConfig",
    "ModernMicroBertForMaskedLM",
    "ModernMicroBertModel",
    "ModernMicroBertPreTrainedModel",
]

"""Model families of hf_streamlm, registered with the transformers Auto classes on import.

After `import hf_streamlm.models`, `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM` resolve
`model_type="microbert"`, and `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` resolve
`model_type="streamlm_decoder"`, and `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM` resolve
`model_type="modern_microbert"` (MicroBERT's modern tier), in this process. `save_pretrained` on a MicroBERT
(classic or modern) masked LM or a decoder causal LM writes `auto_map` plus the model's code files, so the saved
folder loads with `trust_remote_code=True` where hf_streamlm is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .decoder import DecoderConfig, DecoderForCausalLM, DecoderModel, DecoderPreTrainedModel
from .microbert import MicroBertConfig, MicroBertForMaskedLM, MicroBertModel, MicroBertPreTrainedModel
from .modernbert import (
    ModernMicroBertConfig,
    ModernMicroBertForMaskedLM,
    ModernMicroBertModel,
    ModernMicroBertPreTrainedModel,
)


# exist_ok: re-running this module (importlib.reload, or an interpreter that registered the family already) must
# not raise "already used".
AutoConfig.register(MicroBertConfig.model_type, MicroBertConfig, exist_ok=True)
AutoModel.register(MicroBertConfig, MicroBertModel, exist_ok=True)
AutoModelForMaskedLM.register(MicroBertConfig, MicroBertForMaskedLM, exist_ok=True)

AutoConfig.register(DecoderConfig.model_type, DecoderConfig, exist_ok=True)
AutoModel.register(DecoderConfig, DecoderModel, exist_ok=True)
AutoModelForCausalLM.register(DecoderConfig, DecoderForCausalLM, exist_ok=True)

AutoConfig.register(ModernMicroBertConfig.model_type, ModernMicroBertConfig, exist_ok=True)
AutoModel.register(ModernMicroBertConfig, ModernMicroBertModel, exist_ok=True)
AutoModelForMaskedLM.register(ModernMicroBertConfig, ModernMicroBertForMaskedLM, exist_ok=True)

# Tells save_pretrained which Auto class each saved class answers to: it then writes
# `auto_map = {"AutoConfig": "configuration_microbert.MicroBertConfig",
#              "AutoModelForMaskedLM": "modeling_microbert.MicroBertForMaskedLM"}`
# (and the decoder's equivalent with "AutoModelForCausalLM") into config.json and copies both files next to the
# weights.
MicroBertConfig.register_for_auto_class("AutoConfig")
MicroBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
DecoderConfig.register_for_auto_class("AutoConfig")
DecoderForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ModernMicroBertConfig.register_for_auto_class("AutoConfig")
ModernMicroBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")


__all__ = [
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderModel",
    "DecoderPreTrainedModel",
    "MicroBertConfig",
    "MicroBertForMaskedLM",
    "MicroBertModel",
    "MicroBertPreTrainedModel",
    "ModernMicroBertConfig",
    "ModernMicroBertForMaskedLM",
    "ModernMicroBertModel",
    "ModernMicroBertPreTrainedModel",
]

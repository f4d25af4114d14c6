"""Model families of hf_streamlm, registered with the transformers Auto classes on import.

After `import hf_streamlm.models`, `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM` resolve
`model_type="microbert"` in this process, and `save_pretrained` on a MicroBERT model writes `auto_map` plus the
model's code files, so the saved folder loads with `trust_remote_code=True` where hf_streamlm is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .microbert import MicroBertConfig, MicroBertForMaskedLM, MicroBertModel, MicroBertPreTrainedModel


# exist_ok: re-running this module (importlib.reload, or an interpreter that registered the family already) must
# not raise "already used".
AutoConfig.register(MicroBertConfig.model_type, MicroBertConfig, exist_ok=True)
AutoModel.register(MicroBertConfig, MicroBertModel, exist_ok=True)
AutoModelForMaskedLM.register(MicroBertConfig, MicroBertForMaskedLM, exist_ok=True)

# Tells save_pretrained which Auto class each saved class answers to: it then writes
# `auto_map = {"AutoConfig": "configuration_microbert.MicroBertConfig",
#              "AutoModelForMaskedLM": "modeling_microbert.MicroBertForMaskedLM"}`
# into config.json and copies both files next to the weights.
MicroBertConfig.register_for_auto_class("AutoConfig")
MicroBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")


__all__ = ["MicroBertConfig", "MicroBertForMaskedLM", "MicroBertModel", "MicroBertPreTrainedModel"]

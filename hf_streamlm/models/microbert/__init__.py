"""MicroBERT: BERT-architecture masked LM for tiny pretraining runs, parameter-compatible with `BertForMaskedLM`."""

from .configuration_microbert import MicroBertConfig
from .modeling_microbert import MicroBertForMaskedLM, MicroBertModel, MicroBertPreTrainedModel


__all__ = ["MicroBertConfig", "MicroBertForMaskedLM", "MicroBertModel", "MicroBertPreTrainedModel"]

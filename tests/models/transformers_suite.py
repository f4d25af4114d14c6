"""transformers' common model tests (`ModelTesterMixin`, `ConfigTester`) over the project's classes and over the stock
classes they mirror, with the same tiny settings: run by tests/models/test_transformers_suite.py in a pytest of its
own, never collected by the project's pytest (the name does not start with `test_`).

`transformers_tests` is the `tests/` folder of the installed transformers' sdist, which the driver extracts into a
temporary folder and puts on `sys.path`; it is not importable anywhere else. The model testers below are written
for this project, after the pattern of transformers' `LlamaModelTester` and `BertModelTester` (tiny config, random
ids and mask, `prepare_config_and_inputs_for_common`): transformers' own are in `tests/models/`, which the sdist
does not ship. Each family has two test classes, ours and stock, that differ only in the classes under test, so
that the driver can compare their outcomes test by test.
"""

from __future__ import annotations

import unittest

from transformers import BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.auto import modeling_auto
from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

from hf_streamlm.models import (
    DecoderConfig,
    DecoderForCausalLM,
    DecoderModel,
    MicroBertConfig,
    MicroBertForMaskedLM,
    MicroBertModel,
)

# The common tests decide what a class is by its name in transformers' name tables (`MODEL_MAPPING_NAMES` says "a base
# model": the RoPE tests run on it; `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` says "a causal LM": `_prepare_for_class` gives
# it labels, `test_causal_lm_loss_honors_shift_labels` checks it). `AutoModel.register` records the project's classes
# elsewhere (`_extra_content`), so they are entered here, in this test process only, under the project's model types.
for table, model_type, class_name in (
    (modeling_auto.MODEL_MAPPING_NAMES, DecoderConfig.model_type, DecoderModel.__name__),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, DecoderConfig.model_type, DecoderForCausalLM.__name__),
    (modeling_auto.MODEL_MAPPING_NAMES, MicroBertConfig.model_type, MicroBertModel.__name__),
    (modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, MicroBertConfig.model_type, MicroBertForMaskedLM.__name__),
):
    table.setdefault(model_type, class_name)


class DecoderModelTester:
    """A tiny Llama-architecture config and a batch of random ids with a random padding mask.

    The settings are the same for the decoder and for stock Llama (`config_class` is the only difference); GQA (4 query
    heads on 2 K/V heads) so that the K/V repetition is exercised. `max_position_embeddings` is small because the RoPE
    scaling tests run an input 1.5 times as long.
    """

    def __init__(self, parent: unittest.TestCase, config_class: type, batch_size: int = 2, seq_length: int = 7):
        self.parent = parent
        self.config_class = config_class
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.max_position_embeddings = 64

    def config_kwargs(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def prepare_config_and_inputs_for_common(self) -> tuple:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class BertFamilyModelTester:
    """A tiny BERT config and a batch of random ids, token types and padding mask, the same for MicroBERT and for stock
    Bert (`config_class` is the only difference)."""

    def __init__(self, parent: unittest.TestCase, config_class: type, batch_size: int = 2, seq_length: int = 7):
        self.parent = parent
        self.config_class = config_class
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 37
        self.max_position_embeddings = 64
        self.type_vocab_size = 2

    def config_kwargs(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": 0.02,
            "pad_token_id": 0,
        }

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def prepare_config_and_inputs_for_common(self) -> tuple:
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        token_type_ids = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        return self.get_config(), inputs


class _FamilyTest(ModelTesterMixin):
    """What both classes of a family share; the subclasses name the classes under test (`all_model_classes`) and
    the tester (`model_tester_class`, `config_class`)."""

    model_tester_class: type = None
    config_class: type = None

    def setUp(self):
        self.model_tester = self.model_tester_class(self, self.config_class)
        self.config_tester = ConfigTester(self, config_class=self.config_class, **self.model_tester.config_kwargs())

    def test_config(self):
        self.config_tester.run_common_tests()


# `GenerationTesterMixin` is a stand-in (its module is not in the sdist), listed because `ModelTesterMixin` checks
# that the tester of a model that can `generate` inherits it, as transformers' `LlamaModelTest` does.
class DecoderTest(_FamilyTest, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (DecoderModel, DecoderForCausalLM)
    model_tester_class, config_class = DecoderModelTester, DecoderConfig


class StockLlamaTest(_FamilyTest, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (LlamaModel, LlamaForCausalLM)
    model_tester_class, config_class = DecoderModelTester, LlamaConfig


class MicroBertTest(_FamilyTest, unittest.TestCase):
    all_model_classes = (MicroBertModel, MicroBertForMaskedLM)
    model_tester_class, config_class = BertFamilyModelTester, MicroBertConfig


class StockBertTest(_FamilyTest, unittest.TestCase):
    all_model_classes = (BertModel, BertForMaskedLM)
    model_tester_class, config_class = BertFamilyModelTester, BertConfig

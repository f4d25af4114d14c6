"""flex_attention on the CPU at a second batch size in one process (issue 26): the batch that changes makes dynamo
recompile transformers' compiled `flex_attention`, which with symbolic sizes gave C++ that inductor's CPU template
could not compile (`'cur_qSplitSize8' was not declared`); `flex_attention_forward` keeps the shapes static there."""

from __future__ import annotations

import torch

from tests.models.test_decoder import ATOL, tiny_model
from tests.models.test_decoder_attention import REAL, packed_inputs


def test_flex_attention_takes_a_second_batch_size_and_generates_on_the_cpu():
    # The first flex_attention compile of this process is at batch 1, whatever ran before in this worker.
    torch._dynamo.reset()
    eager = tiny_model(attn_implementation="eager")
    flex = tiny_model(attn_implementation="flex_attention")
    packed = packed_inputs()  # batch 2: packed documents, and left padding in row 1
    single = {name: tensor[:1] for name, tensor in packed.items()}  # batch 1: row 0, packed documents
    with torch.no_grad():
        for inputs, real in ((single, REAL[:1]), (packed, REAL), (single, REAL[:1])):
            got, expected = flex(**inputs).logits[real], eager(**inputs).logits[real]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # Generation at batch 2: the prompt, then one-token steps against the cache (new key lengths).
    input_ids, attention_mask = packed["input_ids"], packed["attention_mask"]
    settings = {"attention_mask": attention_mask, "max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(flex.generate(input_ids, **settings), eager.generate(input_ids, **settings))

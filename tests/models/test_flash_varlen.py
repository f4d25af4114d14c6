"""Document masking through the flash kernels at any batch size (issue 26, point 1), on the CPU.

transformers' flash path (``_flash_attention_forward``) is real here; only the kernels are stand-ins: exact torch
attention behind the two entry points of the flash-attn API, ``flash_attn_func`` (dense, causal) and
``flash_attn_varlen_func`` (the segments of a flattened batch), installed as the ``flash_attn_interface`` module
that ``flash_attention_3`` imports, each recording that it ran. The decoder must reach the varlen entry point with
the packed documents' segments at batch 1, 2 and 4, with padding, and compute what SDPA computes with the document
mask: logits and gradients. transformers' own fallback (segments read off ``position_ids``) only works at batch
1: at batch 2 it called the dense entry point, and documents attended to each other (max |logit diff| 0.23).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from hf_streamlm.data.collate import CausalCollator, varlen_kwargs
from tests.host_syncs import Syncs

LAYERS = 2


class StandInKernels:
    """``flash_attn_func`` and ``flash_attn_varlen_func`` in plain torch (float32, exact up to rounding), with the
    flash-attn signatures transformers inspects; ``calls`` names the entry points in the order they ran. While one
    runs, ``counter`` (a :class:`tests.host_syncs.Syncs`) is paused: a real kernel reads nothing back."""

    def __init__(self):
        self.calls: list[str] = []
        self.counter: Syncs | None = None

    @staticmethod
    def attend(q, k, v, allowed, softmax_scale):
        """q: (heads, n, dim), k/v: (kv_heads, n, dim); allowed: (n, n) bool."""
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
        scores = (q @ k.transpose(-1, -2)) * softmax_scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) @ v

    def paused(self):
        outer = self

        class Pause:
            def __enter__(self):
                if outer.counter is not None:
                    outer.counter.paused = True

            def __exit__(self, *exc):
                if outer.counter is not None:
                    outer.counter.paused = False

        return Pause()

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, deterministic=False):
        self.calls.append("dense")
        with self.paused():
            n = q.shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
            out = [self.attend(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), allowed,
                               softmax_scale).transpose(0, 1) for b in range(q.shape[0])]
            return torch.stack(out)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               deterministic=False):
        self.calls.append("varlen")
        with self.paused():
            assert isinstance(max_seqlen_q, int) and cu_seqlens_q.dtype == torch.int32
            lengths = cu_seqlens_q.diff()
            assert int(lengths.max()) == max_seqlen_q and int(cu_seqlens_q[-1]) == q.shape[0]
            segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths.long())
            allowed = segment[:, None] == segment[None, :]
            if causal:
                allowed &= torch.ones_like(allowed).tril()
            return self.attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), allowed,
                               softmax_scale).transpose(0, 1)


@pytest.fixture
def kernels(monkeypatch):
    """The stand-ins as ``flash_attn_interface``, loaded afresh by transformers for ``flash_attention_3``."""
    import transformers.modeling_flash_attention_utils as flash_utils

    stand_ins = StandInKernels()
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = stand_ins.flash_attn_func
    module.flash_attn_varlen_func = stand_ins.flash_attn_varlen_func
    module.flash_attn_with_kvcache = None
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    return stand_ins


def model_pair(seed: int = 0):
    """The same tiny decoder twice: SDPA (the reference) and flash_attention_3 (through the stand-ins)."""
    from hf_streamlm.models.decoder import DecoderConfig, DecoderForCausalLM

    config = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    reference = DecoderForCausalLM(config)
    flash = DecoderForCausalLM(copy.deepcopy(config))
    flash.load_state_dict(reference.state_dict())
    reference.config._attn_implementation = "sdpa"
    flash.config._attn_implementation = "flash_attention_3"  # no availability check: the stand-ins are the kernels
    return reference, flash


def packed_blocks(batch: int, length: int = 24, pad_last: int = 5, seed: int = 0) -> list[dict[str, list[int]]]:
    """Blocks of packed documents as the stream yields them (positions restart, document serials), the last
    block right-padded as packing pads it: the padding continues the last document's positions and id."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for row in range(batch):
        ids, positions, documents, document = [], [], [], 0
        while len(ids) < length:
            n = int(torch.randint(2, 11, (), generator=g))
            n = min(n, length - len(ids))
            ids += torch.randint(1, 97, (n,), generator=g).tolist()
            positions += list(range(n))
            documents += [document] * n
            document += 1
        mask = [1] * length
        if row == batch - 1 and pad_last:
            mask[-pad_last:] = [0] * pad_last
            ids[-pad_last:] = [0] * pad_last
            last = positions[-pad_last - 1]
            positions[-pad_last:] = list(range(last + 1, last + 1 + pad_last))
            documents[-pad_last:] = [documents[-pad_last - 1]] * pad_last
        blocks.append({"input_ids": ids, "attention_mask": mask, "position_ids": positions, "document_ids": documents})
    return blocks


def logits_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.eval()  # full logits and the unfused loss, the same on both sides
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("from_collator", [True, False])
def test_flash_attends_within_documents_at_any_batch_size(kernels, batch_size, from_collator):
    """The collator's segments (what training passes), or none (the model derives them once per forward):
    the varlen entry point in every layer, and SDPA's document-masked logits and gradients."""
    reference, flash = model_pair()
    batch = CausalCollator()(packed_blocks(batch_size))
    assert batch["max_length_q"] <= 10 and batch["cu_seq_lens_q"].dtype == torch.int32
    if not from_collator:
        batch = {k: v for k, v in batch.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                             "max_length_k")}
    expected_logits, expected_grads = logits_and_gradients(reference, batch)
    logits, grads = logits_and_gradients(flash, batch)
    assert kernels.calls == ["varlen"] * LAYERS
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected_logits[real], atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_full_batch_without_documents_takes_the_dense_entry_point(kernels):
    """Plain causal blocks (no document masking, no padding) need no segments: flash's dense kernel."""
    reference, flash = model_pair()
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    expected_logits, expected_grads = logits_and_gradients(reference, batch)
    logits, grads = logits_and_gradients(flash, batch)
    assert kernels.calls == ["dense"] * LAYERS
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["model.layers.0.self_attn.q_proj.weight"],
                               expected_grads["model.layers.0.self_attn.q_proj.weight"], atol=1e-5, rtol=1e-5)


def test_a_training_micro_step_on_flash_reads_nothing_back(kernels):
    """With the collator's segments, a training forward and backward at micro-batch 2 (runpod_1b's) makes no
    call that would sync on CUDA (the stand-in kernels' own work aside)."""
    _, flash = model_pair()
    batch = CausalCollator()(packed_blocks(2, pad_last=0))
    batch.pop("attention_mask")  # the loop drops an all-ones mask (hf_streamlm.train.device_batch)
    flash.train()
    with Syncs() as counter:
        kernels.counter = counter
        flash(**batch).loss.backward()
    assert kernels.calls == ["varlen"] * LAYERS
    assert counter.count == 0, dict(counter.by_op)


def test_segments_split_at_rows_documents_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    documents = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 6, 6, 6, 6]])
    kwargs = varlen_kwargs(mask.numpy(), documents.numpy())
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 8, 10, 12]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3
    positions = torch.tensor([[3, 4, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3]])  # without document ids: restarts
    assert varlen_kwargs(mask.numpy(), None, positions.numpy())["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 8, 10, 12]


def test_flash_refuses_what_it_cannot_compute_exactly(kernels):
    from transformers import DynamicCache

    _, flash = model_pair()
    batch = CausalCollator()(packed_blocks(2, pad_last=0))
    with pytest.raises(ValueError, match="missing"):
        flash(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"])
    flash.eval()
    cache = DynamicCache(config=flash.config)
    flash(input_ids=batch["input_ids"][:, :4], cache=cache)
    with pytest.raises(ValueError, match="cache"):
        flash(input_ids=batch["input_ids"][:, 4:6], document_ids=batch["document_ids"][:, :6], cache=cache)
    # One token without a cache is its own whole sequence: documents change nothing there.
    flash(input_ids=batch["input_ids"][:, :1], document_ids=batch["document_ids"][:, :1], use_cache=False)


def test_the_gpu_check_reports_the_entry_point_that_ran(kernels, monkeypatch):
    """benchmarks/bench_gpu.py's flash rows name the flash-attn functions a step called: counted here on the
    stand-ins, a batch of 2 packed rows built as the GPU check builds them (its `packed_rows`)."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    _, flash = model_pair()
    batch = bench.packed_rows(2, 48, 97, seed=0)
    flash(**batch)  # loads the kernels, as the check's warmup steps do
    with bench.flash_entry_points() as calls:
        flash(**batch).loss.backward()
    assert dict(calls) == {"varlen": LAYERS}

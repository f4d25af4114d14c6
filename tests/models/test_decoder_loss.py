"""The fused LM head + cross entropy of a training step (`LinearCrossEntropy`, `config.loss_chunk_size`): the same
loss and gradients as the unfused head and as stock `LlamaForCausalLM` (fp32, 1e-5), whatever the chunking, the
ignored labels, the normalisation or the tying; no logits are built in a training step and they are in evaluation;
autocast and `torch.compile` keep it. The z-loss (`config.z_loss`), fused and unfused, against the formula."""

from __future__ import annotations

import math

import pytest
import torch

from hf_streamlm.models.decoder import DecoderConfig
from hf_streamlm.models.decoder.modeling_decoder import LinearCrossEntropy
from hf_streamlm.models.export_formats import to_native
from tests.models.test_decoder import ATOL, VOCAB, random_ids, tiny_model


def batch() -> dict[str, torch.Tensor]:
    ids = random_ids((3, 11))
    labels = ids.clone()
    labels[0, 4:8] = -100  # ignored targets inside a row
    labels[2, :] = -100  # and a row with none
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model, inputs, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    model.zero_grad()
    out = model(**inputs, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, out


def record_fused_calls(monkeypatch) -> list:
    """Record each `LinearCrossEntropy.apply` call from now on."""
    calls = []
    original = LinearCrossEntropy.apply

    def recording(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(LinearCrossEntropy, "apply", recording)
    return calls


@pytest.mark.parametrize("chunk", [1, 7, 512])  # one row at a time, chunks not dividing the 33 rows, one chunk
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("num_items", [None, 40, "tensor"])
def test_fused_loss_matches_unfused_and_stock_llama(chunk, tied, num_items, monkeypatch):
    num_items_in_batch = torch.tensor(40) if num_items == "tensor" else num_items
    fused = tiny_model(loss_chunk_size=chunk, tie_word_embeddings=tied).train()
    unfused = tiny_model(loss_chunk_size=0, tie_word_embeddings=tied).train()
    stock = to_native(unfused).train()
    calls = record_fused_calls(monkeypatch)

    kwargs = {"num_items_in_batch": num_items_in_batch}
    loss, grads, out = loss_and_grads(fused, batch(), **kwargs)
    assert len(calls) == 1 and out.logits is None  # the fused path ran; no (batch, seq, vocab) logits
    expected_loss, expected_grads, expected_out = loss_and_grads(unfused, batch(), **kwargs)
    assert len(calls) == 1 and expected_out.logits.shape == (3, 11, VOCAB)  # loss_chunk_size=0: the plain head
    stock_loss, stock_grads, _ = loss_and_grads(stock, batch(), **kwargs)

    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, stock_loss, atol=ATOL, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=ATOL, rtol=0, msg=name)
        torch.testing.assert_close(grads[name], stock_grads[name], atol=ATOL, rtol=0, msg=name)


def test_logits_are_kept_outside_a_training_step(monkeypatch):
    """Eval mode, `torch.no_grad()` and `logits_to_keep` take the plain head: whoever asks for logits gets them."""
    model = tiny_model()
    calls = record_fused_calls(monkeypatch)
    inputs = batch()
    evaluated = model.eval()(**inputs)
    assert evaluated.logits.shape == (3, 11, VOCAB) and evaluated.loss.requires_grad
    with torch.no_grad():
        assert model.train()(**inputs).logits.shape == (3, 11, VOCAB)
    kept = model.train()(input_ids=inputs["input_ids"], logits_to_keep=1)
    assert kept.logits.shape == (3, 1, VOCAB) and kept.loss is None
    assert calls == []
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**inputs, logits_to_keep=1)
    trained = model(**inputs)
    assert len(calls) == 1 and trained.logits is None
    torch.testing.assert_close(trained.loss.detach(), evaluated.loss.detach(), atol=ATOL, rtol=0)


def test_no_target_at_all_gives_nan_like_cross_entropy():
    ids = random_ids((2, 5))
    labels = torch.full_like(ids, -100)
    fused = tiny_model().train()(input_ids=ids, labels=labels).loss
    plain = tiny_model(loss_chunk_size=0).train()(input_ids=ids, labels=labels).loss
    assert math.isnan(fused.item()) and math.isnan(plain.item())


def test_autocast_bf16_casts_once_and_matches_the_unfused_head():
    """Under autocast the head's matmuls run in bfloat16 as the unfused `nn.Linear` does; the loss stays float32 and
    the float32 weights get float32 gradients close to the unfused ones."""
    fused = tiny_model().train()
    unfused = tiny_model(loss_chunk_size=0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, _ = loss_and_grads(fused, batch())
        expected_loss, expected_grads, _ = loss_and_grads(unfused, batch())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, atol=2e-3, rtol=0)
    for name in grads:
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], expected_grads[name], atol=2e-2, rtol=5e-2, msg=name)


def test_compiled_training_step_keeps_the_fused_loss():
    eager = tiny_model(loss_chunk_size=4).train()
    compiled = tiny_model(loss_chunk_size=4).train()
    expected_loss, expected_grads, _ = loss_and_grads(eager, batch())
    torch._dynamo.reset()
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager", fullgraph=False)
    loss, grads, out = loss_and_grads(compiled, batch())
    assert out.logits is None
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_loss_chunk_size_is_validated(value):
    with pytest.raises(ValueError, match="loss_chunk_size"):
        DecoderConfig(loss_chunk_size=value)


def test_a_sharded_head_takes_the_plain_path_its_own_hook_gathers():
    """Only a head whose weight is all here is fused: a DeepSpeed ZeRO-3 partition (`ds_id`) or an FSDP2 shard
    (`DTensor`) is gathered by the head's own forward hook, which the fused loss would bypass."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = tiny_model().train()
    hidden = torch.zeros(1, 2, model.config.hidden_size, requires_grad=True)
    assert model._fuses_loss(hidden, 0)
    model.lm_head.weight.ds_id = 7  # what deepspeed.zero.Init sets on every partitioned parameter
    assert not model._fuses_loss(hidden, 0)
    del model.lm_head.weight.ds_id
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)]))
        assert not model._fuses_loss(hidden, 0)
    finally:
        dist.destroy_process_group()


def z_loss_reference(model, inputs, coefficient: float, num_items=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The z-loss written out on the eval-mode logits (no dropout here, so the same network): the cross entropy plus
    coefficient x sum of log(Z)^2 over the kept targets, both over the target count (or ``num_items``)."""
    model.zero_grad()
    logits = model.eval()(input_ids=inputs["input_ids"]).logits.float().reshape(-1, VOCAB)
    model.train()
    labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    kept = labels != -100
    divisor = kept.sum() if num_items is None else num_items
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / divisor
    z_term = coefficient * (torch.logsumexp(logits, dim=-1).square() * kept).sum() / divisor
    (cross_entropy + z_term).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return cross_entropy.detach() + z_term.detach(), z_term.detach(), grads


@pytest.mark.parametrize("chunk", [0, 1, 7, 512])  # 0: the unfused head (ZeRO-3 and FSDP2 train through it)
@pytest.mark.parametrize("num_items", [None, 40])
def test_z_loss_adds_the_mean_squared_log_normaliser_and_its_gradient(chunk, num_items):
    coefficient = 0.05  # large enough that a wrong gradient term shows at 1e-5
    model = tiny_model(loss_chunk_size=chunk, z_loss=coefficient).train()
    loss, grads, out = loss_and_grads(model, batch(), num_items_in_batch=num_items)
    expected_loss, expected_z, expected_grads = z_loss_reference(model, batch(), coefficient, num_items)
    assert (out.logits is None) == (chunk > 0)
    torch.testing.assert_close(loss, expected_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.z_loss, expected_z, atol=ATOL, rtol=0)
    assert expected_z > 1e-3 and not out.z_loss.requires_grad
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=ATOL, rtol=0, msg=name)
    # Without the z-loss the gradients differ: the term is really trained on.
    plain = tiny_model(loss_chunk_size=chunk).train()
    _, plain_grads, plain_out = loss_and_grads(plain, batch(), num_items_in_batch=num_items)
    assert plain_out.z_loss is None
    assert not torch.allclose(plain_grads["lm_head.weight"], grads["lm_head.weight"], atol=1e-4)


def test_z_loss_is_training_only_and_not_exported():
    model = tiny_model(z_loss=0.05)
    evaluated = model.eval()(**batch())
    assert evaluated.z_loss is None
    plain = tiny_model(loss_chunk_size=0).eval()(**batch())  # the same weights (tiny_model's seed), no z-loss
    torch.testing.assert_close(evaluated.loss, plain.loss, atol=ATOL, rtol=0)
    assert "z_loss" not in to_native(model).config.to_dict()
    with pytest.raises(ValueError, match="`z_loss` must be a non-negative number"):
        DecoderConfig(vocab_size=VOCAB, z_loss=-1.0)

"""DecoderRMSNorm against transformers' LlamaRMSNorm: the values an exported checkpoint reproduces in stock Llama.

In float32 the norm runs torch's fused `rms_norm`; these tests hold it to LlamaRMSNorm's five-kernel formula bit for
bit, forward and backward (the property the export's logits-equality tests rest on). Other dtypes take Llama's own
order of casts.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_streamlm.models.decoder.modeling_decoder import DecoderRMSNorm


def pair(hidden: int, eps: float, dtype: torch.dtype) -> tuple[DecoderRMSNorm, LlamaRMSNorm]:
    ours, stock = DecoderRMSNorm(hidden, eps=eps), LlamaRMSNorm(hidden, eps=eps)
    weight = torch.randn(hidden, generator=torch.Generator().manual_seed(hidden))
    for norm in (ours, stock):
        norm.weight.data.copy_(weight)
        norm.to(dtype)
    return ours, stock


@pytest.mark.parametrize("shape", [(4, 96, 256), (2, 7, 128), (1, 1, 2048), (3, 64)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_float32_forward_and_backward_are_llamas_bit_for_bit(shape, eps):
    ours, stock = pair(shape[-1], eps, torch.float32)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    outputs, grads = [], []
    for norm in (ours, stock):
        out = norm(x)
        outputs.append(out)
        grads.append(torch.autograd.grad(out, (x, norm.weight), upstream))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_float32_path_is_the_fused_kernel():
    """The fast path is taken (one `rms_norm` call), so the speed the benchmark measures is this kernel's."""
    from torch.overrides import TorchFunctionMode

    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    ours, _ = pair(64, 1e-6, torch.float32)
    with Record():
        ours(torch.randn(2, 5, 64))
    assert "rms_norm" in calls and "rsqrt" not in calls, calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_llamas_order_of_casts(dtype):
    ours, stock = pair(128, 1e-6, dtype)
    x = torch.randn(3, 9, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert torch.equal(ours(x), stock(x))

"""The decoder's LM head + cross entropy at `runpod_1b`'s vocabulary and micro-batch (50,000 tokens, 2 x 2048
positions): fused (`model.loss_chunk_size`, the default) against full logits (`loss_chunk_size=0`, what
`LlamaForCausalLM` does), forward + backward, CPU fp32.

    python benchmarks/bench_loss.py [--hidden 256] [--repeats 5] [--chunk 512]

Two figures: the peak memory the head's step adds above the inputs (resident set size, each variant in a fresh
process, so one's allocations cannot hide the other's), and the ratio of median step times (the variants
alternate in one process; process CPU time on one thread). The hidden width only scales the matrix products; the
logits, which the fused loss never builds, are (positions, vocabulary) whatever it is.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from hf_streamlm.models.decoder import DecoderConfig, DecoderForCausalLM

VOCAB, POSITIONS = 50_000, 2 * 2048


def head_model(hidden: int, chunk: int) -> DecoderForCausalLM:
    config = DecoderConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=hidden, loss_chunk_size=chunk)
    return DecoderForCausalLM(config).train()


def head_step(model: DecoderForCausalLM, hidden_states: torch.Tensor, labels: torch.Tensor) -> None:
    """What a training step does after the last norm: the head, the loss, their backward."""
    if model.config.loss_chunk_size:
        loss, _ = model._fused_loss(hidden_states, labels, None)
    else:
        loss, _ = model._loss(model.lm_head(hidden_states), labels, None)
    loss.backward()


def inputs(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(2, POSITIONS // 2, hidden, generator=generator).requires_grad_()
    return hidden_states, torch.randint(0, VOCAB, (2, POSITIONS // 2), generator=generator)


def peak_mib(hidden: int, chunk: int) -> float:
    """Run in a fresh process: peak RSS of one head step above the RSS once model and inputs exist."""
    model = head_model(hidden, chunk)
    hidden_states, labels = inputs(hidden)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    head_step(model, hidden_states, labels)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=DecoderConfig.loss_chunk_size)
    parser.add_argument("--peak-of", type=int, default=None, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.peak_of is not None:
        print(json.dumps(peak_mib(args.hidden, args.peak_of)))
        return

    def child(chunk: int) -> float:
        out = subprocess.run([sys.executable, __file__, "--hidden", str(args.hidden), "--peak-of", str(chunk)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    peaks = {"fused": child(args.chunk), "full": child(0)}
    torch.set_num_threads(1)
    models = {"fused": head_model(args.hidden, args.chunk), "full": head_model(args.hidden, 0)}
    models["full"].load_state_dict(models["fused"].state_dict())
    hidden_states, labels = inputs(args.hidden)
    times: dict[str, list[float]] = {"fused": [], "full": []}
    for repeat in range(args.repeats + 1):
        for key, model in models.items():
            start = time.process_time()
            head_step(model, hidden_states, labels)
            if repeat:  # the first round warms the allocator
                times[key].append(time.process_time() - start)
            model.zero_grad(set_to_none=True)
            hidden_states.grad = None
    ratio = statistics.median(times["fused"]) / statistics.median(times["full"])
    print(f"LM head + loss, vocab {VOCAB}, {POSITIONS} positions, hidden {args.hidden}, chunk {args.chunk}:")
    print(f"  peak memory added: fused {peaks['fused']:.0f} MiB, full logits {peaks['full']:.0f} MiB "
          f"({peaks['fused'] / peaks['full']:.3f}x)")
    print(f"  step time fused / full logits: {ratio:.3f} (median of {args.repeats}, CPU time, 1 thread)")


if __name__ == "__main__":
    main()

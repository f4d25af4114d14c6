"""Collators: causal-LM labels, and BERT masking (15%, 80/10/10, special tokens never masked).

They run on the CPU, in the DataLoader workers, and also compute there what the GPU step would
otherwise have to read back from the device: the packed documents' boundaries for the flash kernels
(``cu_seq_lens_q/k``, ``max_length_q/k``) and the labelled positions of a masked-LM batch. A value the
host computes from the batch costs nothing; the same value derived on the GPU stalls the host once per
micro-step (or, in transformers' flash path, once per layer)."""

from __future__ import annotations

import numpy as np
import torch

from hf_streamlm.config import Config


def stack(examples: list[dict[str, list[int]]], key: str) -> torch.Tensor:
    """``[B, T]`` int64 tensor of one field (through numpy: ~3x faster than torch.tensor on lists)."""
    return torch.from_numpy(np.array([e[key] for e in examples], dtype=np.int64))


def inputs_and_mask(examples: list[dict[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask; blocks without a mask are full (the training stream never pads)."""
    input_ids = stack(examples, "input_ids")
    if "attention_mask" in examples[0]:
        return input_ids, stack(examples, "attention_mask")
    return input_ids, torch.ones_like(input_ids)


def varlen_kwargs(attention_mask: np.ndarray, document_ids: np.ndarray | None = None,
                  position_ids: np.ndarray | None = None) -> dict[str, torch.Tensor | int]:
    """transformers' ``FlashAttentionKwargs`` of a ``(batch, seq)`` batch flattened into one sequence of
    ``batch * seq`` tokens: ``cu_seq_lens_q/k``, the int32 offsets where each segment starts (and the total
    at the end), and ``max_length_q/k``, the longest segment, a Python int (the kernels take it as one).

    A segment is a run of tokens that attend to each other: a new one starts at every row, at every
    document change (``document_ids``, else ``position_ids`` that do not continue: the rule of
    transformers' ``find_packed_sequence_indices``) and where padding starts or stops. Padding is thus a
    segment of its own, so no real token attends to it and every position has an output (the kernels
    leave positions outside every segment unwritten). ``DataCollatorWithFlattening(return_flash_attn_kwargs=
    True)`` emits the same keys for a batch it flattens itself."""
    rows, length = attention_mask.shape
    starts = np.zeros((rows, length), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    if document_ids is not None:
        starts[:, 1:] |= document_ids[:, 1:] != document_ids[:, :-1]
    elif position_ids is not None:
        starts[:, 1:] |= position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = np.append(np.flatnonzero(starts), rows * length).astype(np.int32)
    cu_seq_lens = torch.from_numpy(offsets)
    longest = int(np.diff(offsets).max())
    # One tensor for queries and keys (self-attention), as transformers' own helpers return them.
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}


def batch_to(batch: dict, device: torch.device | str, non_blocking: bool = False) -> dict:
    """``batch`` with its tensors on ``device``; other values (``max_length_q``: Python ints) as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


class CausalCollator:
    """Stack blocks; labels are the inputs (the model shifts), padding ignored with -100.

    Packed documents (``data.document_masking``: the blocks carry ``position_ids`` and ``document_ids``)
    also get the flattened batch's document boundaries (:func:`varlen_kwargs`), which the decoder hands to
    the flash kernels: exact document masking at any batch size without a device read-back. The other
    kernels take the documents from ``document_ids`` and ignore them."""

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor | int]:
        input_ids, attention_mask = inputs_and_mask(examples)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
        for key in ("position_ids", "document_ids"):  # packed-document inputs (data.document_masking)
            if key in examples[0]:
                batch[key] = stack(examples, key)
        if "position_ids" in batch:
            documents = batch.get("document_ids")
            batch.update(varlen_kwargs(attention_mask.numpy(), None if documents is None else documents.numpy(),
                                       batch["position_ids"].numpy()))
        return batch


class MLMCollator:
    """BERT's masking scheme (Devlin et al. 2019, sec. 3.1), seeded so runs are repeatable.

    ``mlm_probability`` of the non-special, non-padding tokens are chosen; of those 80% become
    ``[MASK]``, 10% a random token, 10% stay. Labels are -100 everywhere else. Packed documents
    (``data.document_masking``, modern MicroBERT) keep their ``position_ids``/``document_ids`` and get the
    flattened batch's boundaries for the flash kernels (:func:`varlen_kwargs`), as in :class:`CausalCollator`.
    """

    def __init__(
        self,
        mask_token_id: int,
        vocab_size: int,
        special_ids: list[int],
        mlm_probability: float = 0.15,
        seed: int = 0,
    ):
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.generator: torch.Generator | None = None

    def _rng(self) -> torch.Generator:
        # Created on first use, in the process (DataLoader worker) that masks; each worker's
        # collator is built with its own seed by the training stream.
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        return self.generator

    def get_rng_state(self) -> torch.Tensor:
        return self._rng().get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._rng().set_state(state)

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        g = self._rng()
        input_ids, attention_mask = inputs_and_mask(examples)
        maskable = (attention_mask == 1) & ~torch.isin(input_ids, self.special_ids)
        chosen = (torch.rand(input_ids.shape, generator=g) < self.mlm_probability) & maskable
        labels = input_ids.masked_fill(~chosen, -100)
        roll = torch.rand(input_ids.shape, generator=g)
        masked = input_ids.masked_fill(chosen & (roll < 0.8), self.mask_token_id)
        randomize = chosen & (roll >= 0.8) & (roll < 0.9)
        random_ids = torch.randint(self.vocab_size, input_ids.shape, generator=g)
        masked = torch.where(randomize, random_ids, masked)
        # The labelled positions, flat over (batch, seq), found on the host (numpy, no tensor operation): the
        # model's training head gathers them with an integer index. Derived on the GPU (``hidden[labels !=
        # -100]``, a boolean index), they cost a device read-back per micro-step.
        positions = torch.from_numpy(np.flatnonzero(chosen.numpy()))
        batch = {"input_ids": masked, "attention_mask": attention_mask, "labels": labels, "masked_positions": positions}
        if "document_ids" in examples[0]:  # packed documents (data.document_masking, the modern MicroBERT)
            for key in ("position_ids", "document_ids"):
                batch[key] = stack(examples, key)
            batch.update(varlen_kwargs(attention_mask.numpy(), batch["document_ids"].numpy()))
        return batch


def make_collator(config: Config, tokenizer, seed: int) -> CausalCollator | MLMCollator:
    """The collator of ``config.model.type``: MLM masking seeded by ``seed`` for MicroBERT, causal labels
    for the decoder. Training, eval, ``stats`` and ``hf-streamlm eval`` all take it from here, so the
    figures they report come from the same batches."""
    from hf_streamlm.data.schedule import first_rate

    if config.model.type == "microbert":
        return MLMCollator(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=tokenizer.all_special_ids,
            mlm_probability=first_rate(config),  # the stages, where given, are applied by the training stream
            seed=seed,
        )
    return CausalCollator()

"""Sources mixed along a schedule (``data.schedule``) or by tokens (``data.mix_by: tokens``).

``datasets.interleave_datasets`` draws each document's source when it is read, ahead of the shuffle buffer, the
tokenizer and the packing: a mixture that changes during the run would reach the batches a buffer later
(``runpod_1b``: 65,536 documents per rank), and it counts documents, so a source of short documents gets a smaller
share of the tokens than its weight says. Here each source is read, shuffled and tokenized on its own (a
:class:`SourceReader` per source: the :class:`~hf_streamlm.data.stream.WorkerPipeline` stages up to tokenization, with
their own state, passes and elastic hand-over), and :class:`MixedPipeline` takes whole tokenized documents from them
where they are packed, so the weights apply at the tokens' place in the run:

- **The rule** (Megatron's blended-dataset index, per token): each source carries a credit, what it is owed; the
  next document comes from the source owed most, then every source is credited its weight times the document's
  tokens (``mix_by: documents``: times 1) and the chosen one is charged them. Deterministic: no RNG to keep, the
  credits are the state; each source's share stays within one document of its weight on every reader.
- **The clock**: a reader's position in the run is its tokens handed out times the readers of its layout
  (:meth:`~hf_streamlm.data.stream.WorkerPipeline.trained`), global tokens as ``data.schedule`` counts them.
- **Stage boundaries**: the credits start again at each stage, and the block shuffle never mixes stages (as it
  never mixes passes), so the blocks of a stage are trained within the stage's tokens.
- **Realized**: the tokens handed out per stage and source (``stage_tokens``) are in the state, the logs and the
  model card.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np

from hf_streamlm.config import ConfigError
from hf_streamlm.data.elastic import packed_ahead, take_counts
from hf_streamlm.data.schedule import Schedule
from hf_streamlm.data.stream import WorkerPipeline

logger = logging.getLogger(__name__)


class SourceReader(WorkerPipeline):
    """One source's share of a reader: read, shuffled, tokenized (no blocks: :class:`MixedPipeline` takes whole
    documents with :meth:`take_document`). At a layout change it takes over the same source's part of the old
    readers, whose rebuilding goes through the old mixing pipelines (their snapshots are of those)."""

    def __init__(self, index: int, rebuild_mixer, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = index
        self.rebuild_mixer = rebuild_mixer  # part -> the old MixedPipeline, where it stood
        self.prebuilt: deque[WorkerPipeline] = deque()  # old readers already rebuilt (MixedPipeline.start_elastic)

    def _rebuild(self, part: dict[str, Any]) -> WorkerPipeline:
        if self.prebuilt:
            return self.prebuilt.popleft()
        return self.rebuild_mixer(part).subs[self.index]

    def _ahead(self, old: WorkerPipeline, part: dict[str, Any]) -> list[list[tuple]]:
        """The old reader's documents tokenized and not mixed yet, whole, document ``u`` to part ``u mod k``."""
        docs = list(old.handed)
        start = old.cut
        for end, source, key, epoch in old.doc_ends:
            docs.append([(old.tokens[start - old.cut:end - old.cut], source, key, epoch, True)])
            start = end
        return docs[part["part"]::part["k"]]


class MixedPipeline(WorkerPipeline):
    """Packing, block shuffle and batches over whole documents taken from one :class:`SourceReader` per source
    along ``schedule`` (see the module docstring). Reads nothing itself."""

    def __init__(self, subs: list[SourceReader], schedule: Schedule, by_tokens: bool, names: list[str], **kwargs):
        super().__init__(None, None, **kwargs)
        self.subs = subs
        self.schedule = schedule
        self.by_tokens = by_tokens
        self.names = names
        self.credit = [0.0] * len(subs)
        self.mix_stage = 0
        self.empty: set[int] = set()  # sources with no document for this reader (recomputed after a resume)
        self.stage_tokens: dict[int, dict[int, int]] = {}  # stage -> source -> tokens handed out

    def _buffered_tokens(self) -> int:
        """Tokens in the block-shuffle buffer: cut, not handed out yet."""
        return self.block_size * (len(self.blocks) + (self.block_wait is not None))

    def _fill(self) -> bool:
        position = self.trained(self._buffered_tokens() + len(self.tokens))  # where the next document starts
        stage = self.schedule.stage_at(position)
        if stage != self.mix_stage:
            self.mix_stage, self.credit = stage, [0.0] * len(self.subs)
        weights = self.schedule.value_at(position)
        while True:
            live = [s for s, w in enumerate(weights) if w > 0 and s not in self.empty]
            if not live:
                raise ConfigError(f"data.schedule stage {stage} reads only sources with no documents for this reader "
                                  f"({', '.join(self.names[s] for s, w in enumerate(weights) if w > 0)}): their shards "
                                  "went to other ranks and DataLoader workers, or every document was filtered out")
            total = sum(weights[s] for s in live)
            share = {s: weights[s] / total for s in live}
            pick = max(live, key=lambda s: (self.credit[s] + share[s], share[s], -s))
            doc = self.subs[pick].take_document()
            if doc is not None:
                break
            self.empty.add(pick)
            logger.warning("data source '%s' has no documents for this reader (its shards went to other readers, or "
                           "all were filtered out): its weight goes to the other sources", self.names[pick])
        ids, source, key, epoch = doc
        units = len(ids) if self.by_tokens else 1
        for s in live:
            self.credit[s] += share[s] * units
        self.credit[pick] -= units
        self.source_docs[source] = self.source_docs.get(source, 0) + 1
        self.source_tokens[source] = self.source_tokens.get(source, 0) + len(ids)
        self.tokens.extend(ids)
        self.next_serial += 1
        self.doc_ends.append((self.cut + len(self.tokens), source, key, epoch))
        return True

    def _block_phase(self) -> int:
        return self.schedule.stage_at(self.trained(self._buffered_tokens()))

    def _emitted(self, pieces: list[tuple], pad: int) -> None:
        counts = self.stage_tokens.setdefault(self.schedule.stage_at(self.trained()), {})
        for tokens, source, *_ in pieces:
            counts[source] = counts.get(source, 0) + len(tokens)
        super()._emitted(pieces, pad)

    def read_epoch(self) -> list[int]:
        return [sub.epoch for sub in self.subs]

    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for sub in self.subs:
            for kind, n in sub.skipped().items():
                total[kind] = total.get(kind, 0) + n
        return total

    def next_batch(self):
        batch = super().next_batch()
        if batch is not None:
            batch["_epoch"] = min(sub.epoch for sub in self.subs)
            # The stage of the batch's last token.
            mix = {"stage": self.schedule.stage_at(self.trained(-1)), "stages": len(self.schedule.ends),
                   "stage_tokens": {k: dict(v) for k, v in self.stage_tokens.items()}}
            batch["_sources"] = (*batch["_sources"], mix)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sources"] = [sub.state_dict() for sub in self.subs]
        state["mix"] = {"credit": np.array(self.credit, dtype=np.float64), "stage": self.mix_stage,
                        "stage_tokens": {k: dict(v) for k, v in self.stage_tokens.items()}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "anchor" not in state:  # handed over at a layout change: start_elastic did it all
            return
        for sub, sub_state in zip(self.subs, state["sources"]):
            sub.load_state_dict(sub_state)
        mix = state["mix"]
        self.credit, self.mix_stage = mix["credit"].tolist(), mix["stage"]
        self.stage_tokens = {k: dict(v) for k, v in mix["stage_tokens"].items()}

    def start_elastic(self, origin: dict[str, Any]) -> None:
        """Take over the old mixing readers ``origin`` names: their packing content (blocks, as a single stream's
        readers hand it over), their counts; each source's reader takes over that source's part of them."""
        self.base_tokens = origin.get("tokens", 0)
        olds = [self._rebuild(part) for part in origin["parts"]]
        blocks = []
        for old, part in zip(olds, origin["parts"]):
            blocks += packed_ahead(old)[part["part"]::part["k"]]
            if part["part"] == 0:
                take_counts(self, old)
                for stage, counts in old.stage_tokens.items():
                    mine = self.stage_tokens.setdefault(stage, {})
                    for source, n in counts.items():
                        mine[source] = mine.get(source, 0) + n
        self.handed.extend(blocks)
        last = origin["last_epoch"]
        for s, sub in enumerate(self.subs):
            sub.prebuilt = deque(old.subs[s] for old in olds)
            sub.start_elastic({"parts": origin["parts"], "last_epoch": last[s] if isinstance(last, list) else last,
                               "tokens": self.base_tokens})

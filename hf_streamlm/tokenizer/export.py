"""The tokenizer files of an export, readable by transformers 4.x and 5.x alike.

transformers 5 saves a fast tokenizer as ``"tokenizer_class": "TokenizersBackend"``, a class 4.x does
not have (``ValueError: Tokenizer class TokenizersBackend does not exist``), and writes the arguments
it was *loaded* with (``is_local``, ``local_files_only``) as if they were settings. Both versions know
``PreTrainedTokenizerFast`` (5.x maps it to ``TokenizersBackend``), which loads ``tokenizer.json`` as it
is: the same ids in both. What the file must also say, because the defaults are wrong for a model:

- ``model_input_names``: a causal LM takes no ``token_type_ids`` (4.x ``generate`` refuses them);
  BERT takes them;
- ``model_max_length``: the model's positions (``max_position_embeddings``), so that ``truncation=True``
  (pipelines, lm-evaluation-harness) cuts long inputs where the model ends instead of at 1e9.
"""

from __future__ import annotations

import json
from pathlib import Path

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""A tokenizer class both transformers 4.x and 5.x resolve (5.x: an alias of ``TokenizersBackend``)."""

LOAD_TIME_KEYS = ("is_local", "local_files_only", "backend", "name_or_path", "_commit_hash")
"""Keys transformers 5 writes into ``tokenizer_config.json`` from how the tokenizer was loaded (or, for
``backend``, that only 5.x reads); they describe that load, not the tokenizer."""

INPUT_NAMES = {
    "microbert": ["input_ids", "token_type_ids", "attention_mask"],
    "decoder": ["input_ids", "attention_mask"],
}
"""``model_input_names`` per family (``model.type``): what the stock BERT / Llama forward takes."""


def save_export_tokenizer(tokenizer, output_dir: str | Path, family: str, max_length: int) -> Path:
    """Save ``tokenizer`` into ``output_dir`` for a ``family`` model with ``max_length`` positions, so that
    ``AutoTokenizer.from_pretrained(output_dir)`` gives the same ids in transformers 4.x and 5.x and
    returns exactly the inputs the model takes. Returns the path of ``tokenizer_config.json``."""
    if family not in INPUT_NAMES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(INPUT_NAMES)}")
    output_dir = Path(output_dir)
    tokenizer.save_pretrained(output_dir)
    path = output_dir / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    for key in LOAD_TIME_KEYS:
        settings.pop(key, None)
    settings["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    settings["model_input_names"] = INPUT_NAMES[family]
    settings["model_max_length"] = int(max_length)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


__all__ = ["INPUT_NAMES", "LOAD_TIME_KEYS", "PORTABLE_TOKENIZER_CLASS", "save_export_tokenizer"]

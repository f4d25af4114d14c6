"""Hub-format export of a trained model: weights (safetensors), config, tokenizer, model card
(:mod:`hf_streamlm.card`), and the resolved training config; optional ``push_to_hub``."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedModel

from hf_streamlm.card import TRAINING_CONFIG, model_card
from hf_streamlm.config import Config

logger = logging.getLogger(__name__)

NEVER_PUSHED = ["*.pt", "*.pth", "*.bin", "*.pkl", "*.pickle", "*.ckpt", "optimizer*", "*/optimizer*", "scheduler*",
                "*/scheduler*", "random_states*", "*/random_states*", "rng_state*", "*/rng_state*"]
"""Left out of every push (``upload_folder`` ignore patterns): optimizer, scheduler and RNG states and
anything pickled -- a checkpoint's training state. An export is safetensors, JSON, YAML and text."""


def export_run(model: PreTrainedModel, tokenizer, config: Config, output_dir: Path, fmt: str = "native",
               summary: dict | None = None) -> Path:
    """Write ``output_dir`` so that ``AutoModel*.from_pretrained(output_dir)``, ``AutoTokenizer`` and ``pipeline``
    work, in transformers 4.x as in 5.x (native format; the custom format's code needs 5.x)."""
    from hf_streamlm.models.export_formats import save_model
    from hf_streamlm.tokenizer.export import save_export_tokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, output_dir, format=fmt)
    # model_max_length = the positions the model has: truncation=True then cuts where the model ends.
    save_export_tokenizer(tokenizer, output_dir, config.model.type, model.config.max_position_embeddings)
    config.save(output_dir / TRAINING_CONFIG)
    model_card(model, config, fmt, summary).save(output_dir / "README.md")
    return output_dir


def export_to_push(path: str | Path) -> Path:
    """The export folder to push for ``path``: the folder itself when it holds a model (``config.json``),
    else the ``export/`` of a run directory."""
    from hf_streamlm.config import ConfigError

    path = Path(path)
    for folder in (path, path / "export"):
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(f"'{path}' is neither an export folder (with config.json) nor a run directory with an export/; "
                      "make one with: hf-streamlm export CHECKPOINT --output DIR")


def push_export(export_dir: Path, config: Config) -> str:
    """Upload the export folder (or a run directory's ``export/``) to ``hub.repo_id`` on the branch
    ``hub.revision``, creating the repository (``hub.private``) and the branch if needed; returns the
    commit URL. The token is huggingface_hub's: ``HF_TOKEN`` or the stored login. Training state
    (:data:`NEVER_PUSHED`) is never uploaded, and a folder that did not change makes no new commit."""
    from huggingface_hub import HfApi

    from hf_streamlm.config import ConfigError

    hub = config.hub
    if not hub.repo_id:
        raise ConfigError("'hub.repo_id' is not set: the repository to push to (user/name)")
    export_dir = export_to_push(export_dir)
    api = HfApi()
    api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
    if hub.revision and hub.revision != "main":  # upload_folder needs the branch to exist
        api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=hub.repo_id, folder_path=str(export_dir), revision=hub.revision, commit_message=hub.commit_message,
        ignore_patterns=NEVER_PUSHED,
    )
    logger.info("pushed %s to %s (branch %s): %s", export_dir, hub.repo_id, hub.revision or "main", info.commit_url)
    return str(info.commit_url)


def export_checkpoint(path: str | Path, output_dir: str | Path, fmt: str = "native") -> Path:
    import json

    from hf_streamlm.train.checkpoint import STATE_FILE, find_checkpoint, load_checkpoint_model

    model, tokenizer, config = load_checkpoint_model(path)
    summary = json.loads((find_checkpoint(path) / STATE_FILE).read_text())
    return export_run(model, tokenizer, config, Path(output_dir), fmt, summary)

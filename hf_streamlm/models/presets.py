"""Named model shapes: the MicroBERT tiers of seed 003 (classic, and their modern counterparts) and the 1B
decoder of seed 004.

``model.preset=NAME`` fills the ``model`` section; keys set in the recipe or on the command line win
(command line > recipe > preset > defaults). ``hf-streamlm models`` lists them with parameter counts.
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Seed 003 "Model Configurations" table: vocab 10,000, max length 128, BERT MLP ratio 4.
    "microbert-imdb-small": {"type": "microbert", "num_layers": 2, "num_attention_heads": 2, "hidden_size": 4,
                             "max_position_embeddings": 128},
    "microbert-hf-medium": {"type": "microbert", "num_layers": 4, "num_attention_heads": 4, "hidden_size": 8,
                            "max_position_embeddings": 128},
    "microbert-hf-large": {"type": "microbert", "num_layers": 6, "num_attention_heads": 8, "hidden_size": 16,
                           "max_position_embeddings": 128},
    "microbert-hf-extra-large": {"type": "microbert", "num_layers": 8, "num_attention_heads": 12, "hidden_size": 24,
                                 "max_position_embeddings": 128},
    # The modern tier (model.architecture=modern: ModernBERT's design, docs/models.md) at the same width, depth
    # and heads; its GeGLU MLP is 1.5 x hidden wide (ModernBERT-base's ratio) and its window ModernBERT's 128.
    "modern-microbert-imdb-small": {"type": "microbert", "architecture": "modern", "num_layers": 2,
                                    "num_attention_heads": 2, "hidden_size": 4, "max_position_embeddings": 128},
    "modern-microbert-hf-medium": {"type": "microbert", "architecture": "modern", "num_layers": 4,
                                   "num_attention_heads": 4, "hidden_size": 8, "max_position_embeddings": 128},
    "modern-microbert-hf-large": {"type": "microbert", "architecture": "modern", "num_layers": 6,
                                  "num_attention_heads": 8, "hidden_size": 16, "max_position_embeddings": 128},
    "modern-microbert-hf-extra-large": {"type": "microbert", "architecture": "modern", "num_layers": 8,
                                        "num_attention_heads": 12, "hidden_size": 24, "max_position_embeddings": 128},
    # Seed 004 training.yaml: hidden 2048, 20 layers, 32 heads, 32 KV heads, 2048 positions. The seed's
    # intermediate 8192 assumes a 2-matrix MLP (2*2048*8192 = 33.6M weights per layer); a gated MLP has
    # 3 matrices, so the same budget is 8192 * 2/3 = 5461, rounded up to a multiple of 128: 5504
    # (the LLaMA paper's 2/3 * 4d rule). With tied 50k embeddings that is ~1.11B parameters; 8192 gated
    # would be ~1.5B.
    "decoder-1b": {"type": "decoder", "num_layers": 20, "num_attention_heads": 32, "num_key_value_heads": 32,
                   "hidden_size": 2048, "intermediate_size": 5504, "max_position_embeddings": 2048,
                   "tie_word_embeddings": True},
}

SEED_PARAMETER_COUNTS = {
    "microbert-imdb-small": "~41K",
    "microbert-hf-medium": "~84K",
    "microbert-hf-large": "~182K",
    "microbert-hf-extra-large": "~301K",
    "decoder-1b": "1B",
}
"""What the seed documents report for each shape (seed 003's table; seed 004's name)."""

PRESET_VOCAB = {"microbert": 10_000, "decoder": 50_000}
"""Vocabulary used to count parameters: seed 003's 10,000 words; seed 004's 50k BPE."""

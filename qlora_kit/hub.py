"""Hugging Face Hub IDs as --model: `org/name` or `org/name@revision`, resolved to a snapshot folder in
huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE), fetched with its own `snapshot_download`.

A local path always wins over a Hub ID. Online, only the files the loader reads are fetched (config,
safetensors, tokenizer, chat template), never pickled weights; with HF_HUB_OFFLINE=1 the cached snapshot
is used. The environment is read when called (huggingface_hub reads its constants once, at import).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from huggingface_hub import constants, errors, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from .config import one_line

logger = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.*",
               "merges.txt", "added_tokens.json", "chat_template.*")
CONFIG_FILES = ("config.json",)  # what a memory estimate reads
NEVER = ("*/*", "*.bin", "*.pt", "*.pth", "*.ckpt")  # subfolders are never read; pickled weights never loaded
FETCH_HINT = ("'*.json'", "'*.safetensors'", "'tokenizer.model'", "'*.txt'", "'*.jinja'")  # MODEL_FILES, for `hf`
_FILE_SUFFIXES = (".gguf", ".json")  # a missing file of these kinds is a mistyped path, not a Hub repo
_INCOMPLETE = getattr(errors, "IncompleteSnapshotError", ())  # raised by newer huggingface_hub only


def is_hub_id(s: object) -> bool:
    """Whether `s` is a string shaped `org/name` or `org/name@revision` (huggingface_hub's repo-id rules)
    that is not an existing local path. A Path object is always a local path."""
    if not isinstance(s, str) or s.endswith(_FILE_SUFFIXES):
        return False
    repo, at, revision = s.partition("@")
    if (at and not revision.strip()) or repo.count("/") != 1:
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return not Path(s).exists()


def split_hub_id(model: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> ('org/name', None)."""
    repo, _, revision = model.partition("@")
    return repo, revision or None


def hub_cache() -> Path:
    """huggingface_hub's cache folder: HF_HUB_CACHE, else $HF_HOME/hub, as set now, else its import-time value."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or (
        os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else constants.HF_HUB_CACHE)
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, else huggingface_hub's import-time value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(model: str, *, cache_dir: str | os.PathLike | None = None,
                 files: tuple[str, ...] = MODEL_FILES) -> Path:
    """The snapshot folder of a Hub model in huggingface_hub's cache; online, `files` are fetched first.

    Args:
        model: 'org/name' or 'org/name@revision' (a branch, tag or commit).
        cache_dir: huggingface_hub's cache (default: HF_HUB_CACHE / HF_HOME, read now).
        files: patterns of the files to fetch (top-level only; pickled weights never).
    Raises:
        FileNotFoundError: not cached while offline, no such repo or revision (one line naming it).
        ValueError: a gated repo, the Hub unreachable, another Hub error (one line).
    """
    repo, revision = split_hub_id(model)
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache()
    offline = hub_offline()
    if not offline:
        logger.info("%s: fetching its config, safetensors and tokenizer from the Hugging Face Hub into %s "
                    "(cached files are not fetched again)", model, cache)
    def fetch(patterns) -> str:
        return snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=list(patterns), ignore_patterns=list(NEVER))

    try:
        if offline or "*.safetensors" not in files:
            folder = fetch(files)
        else:  # the weights the index names (or model.safetensors), not every *.safetensors: some repos also
            # ship the same weights in another layout (Mistral's consolidated.safetensors)
            folder = fetch([f for f in files if f != "*.safetensors"])
            weights = _indexed_weights(Path(folder))
            folder = fetch(weights)
            if not any((Path(folder) / w).is_file() for w in weights):  # a single file of another name
                folder = fetch(["*.safetensors"])
    except _INCOMPLETE:
        raise FileNotFoundError(f"{model}: the cached snapshot in {cache} is incomplete; run once without "
                                f"HF_HUB_OFFLINE to complete it") from None
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(_not_cached(model, cache, offline, e)) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{model}: no revision {revision!r} of {repo} on the Hugging Face Hub") from None
    except GatedRepoError:
        raise ValueError(f"{model}: a gated repo; accept its terms on https://huggingface.co/{repo} and log in "
                         "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{model}: no such local folder, and no such model on the Hugging Face Hub "
                                "(if it is private, log in: hf auth login)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ValueError(f"{model}: cannot fetch it from the Hugging Face Hub ({one_line(e)})") from None
    return Path(folder)


def _indexed_weights(folder: Path) -> list[str]:
    """The safetensors files a snapshot's index lists, or ['model.safetensors'] without an index."""
    index = folder / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({f for f in weight_map.values() if isinstance(f, str) and "/" not in f})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ["model.safetensors"]


def _not_cached(model: str, cache: Path, offline: bool, error: Exception) -> str:
    """One line: what of `model` the cache lacks, and how to fetch it."""
    repo, revision = split_hub_id(model)
    stored = cache / repo_folder_name(repo_id=repo, repo_type="model")
    rev = f" --revision {revision}" if revision else ""
    fetch = (f"run once without HF_HUB_OFFLINE to fetch it, or: hf download {repo}{rev} "
             + " ".join(f"--include {p}" for p in FETCH_HINT))
    if not offline:
        cause = one_line(error.__cause__ or error)
        return f"{model}: no such local folder; the Hugging Face Hub could not be reached ({cause}) and {stored} " \
               "holds no snapshot of it"
    if stored.is_dir():
        refs = sorted(p.relative_to(stored / "refs").as_posix() for p in (stored / "refs").rglob("*") if p.is_file())
        commits = sorted(p.name for p in (stored / "snapshots").glob("*"))
        have = ", ".join(refs + [c[:12] for c in commits]) or "nothing"
        return f"{model}: revision {revision or 'main'!r} is not in the Hugging Face cache at {stored} " \
               f"(cached: {have}; HF_HUB_OFFLINE is set); {fetch}"
    return f"{model}: no such local folder, and not in the Hugging Face cache at {cache} (HF_HUB_OFFLINE is set); " \
           f"{fetch}"

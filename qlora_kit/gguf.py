"""Turn a GGUF checkpoint into a plain Hugging Face folder once, and reuse it afterwards.

QLoRA quantizes a dense base model itself, so a GGUF file (already quantized, in llama.cpp's own
block formats) is first unpacked to ordinary bf16 weights with transformers' GGUF reader. That takes
tens of seconds even for small models, so the result is cached under a key taken from the file (size,
modification time, first and last MiB) and the dtype.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .io import cache_root

logger = logging.getLogger(__name__)

_MAGIC = b"GGUF"
_MIB = 1 << 20


def _check_gguf(gguf_path: str | os.PathLike) -> Path:
    """Resolve `gguf_path` and make sure it is a GGUF file, before transformers gives a vaguer error."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file (check the path)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); pass a .gguf model file")
    return path


def _fingerprint(path: Path, dtype: torch.dtype) -> str:
    """Short hash of size, modification time, first and last MiB (cheap, unlike hashing GBs) and dtype.

    The dtype is part of the key so a bf16 conversion is never handed out to a float32 request; the
    modification time catches a same-size file that differs only in the middle.
    """
    st = path.stat()
    size = st.st_size
    h = hashlib.sha256(f"{size}:{st.st_mtime_ns}:{dtype}".encode())
    with path.open("rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(size - _MIB, 0))
        h.update(f.read(_MIB))
    return h.hexdigest()[:16]


def _is_complete(folder: Path) -> bool:
    # Folders only appear under their final name by an atomic rename, so config.json means "done".
    return (folder / "config.json").is_file()


def _convert(path: Path, out: Path, dtype: torch.dtype) -> None:
    """Load `path` with transformers, check the weights came out dense, save config/weights/tokenizer to `out`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parent, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(parent, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    kwargs = {}
    # Recent transformers keep GGUF weights packed in their blocks unless told to unpack them;
    # older versions (no GgufConfig) always unpack.
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    # transformers' own progress bar for this step is a plain tqdm that no setting of its turns off; the
    # "converting ... (once)" line logged by convert_gguf says what is happening instead
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=name, dtype=dtype, **kwargs)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar

    # Trust but verify: a packed layer shows up as a uint8/int tensor or a shape unlike the dense model's.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config).state_dict()
    for key, tensor in model.state_dict().items():
        ref = skeleton.get(key)
        if ref is None or not tensor.is_floating_point() or tensor.shape != ref.shape:
            raise ValueError(
                f"{path}: transformers did not load a dense model ({key}: {tensor.dtype} "
                f"{tuple(tensor.shape)}); try a newer transformers or a GGUF with a supported architecture"
            )

    # The weights are plain now; a leftover GGUF quantizer would make save_pretrained refuse
    # ("not serializable") and a saved quantization_config would make loaders expect GGUF blocks.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    cfg_file = out / "config.json"
    saved = json.loads(cfg_file.read_text())
    if saved.pop("quantization_config", None) is not None:
        cfg_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if not list(out.glob("*.safetensors")) or list(out.glob("*.bin")):
        raise ValueError(f"{path}: conversion did not produce safetensors-only weights in {out}")


def gguf_to_hf_dir(
    gguf_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Convert a GGUF model once into a cached Hugging Face folder and return that folder.

    The folder (config.json, model*.safetensors, tokenizer files) is
    `<root>/gguf/<file stem>-<hash>`, the hash taken from the file's size, modification time, first and
    last MiB and `dtype`; later calls with the same file return it without converting again.

    Args:
        gguf_path: a GGUF model file that transformers can read.
        cache_dir: cache root; default $QLORA_KIT_CACHE, else ~/.cache/qlora-kit.
        dtype: floating dtype the unpacked weights are stored in.

    Returns:
        Path of the converted folder, loadable with `AutoModelForCausalLM.from_pretrained(folder)`.

    Raises:
        FileNotFoundError: `gguf_path` does not exist.
        ValueError: the file is not GGUF, or transformers did not produce a dense model from it.
    """
    path = _check_gguf(gguf_path)
    final = cache_root(cache_dir) / "gguf" / f"{path.stem}-{_fingerprint(path, dtype)}"
    if _is_complete(final):
        return final
    if final.exists():  # not ours to explain (e.g. a partly deleted cache): rebuild it
        shutil.rmtree(final, ignore_errors=True)

    final.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as `final`, so the rename below is atomic and never crosses filesystems.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        logger.info("converting %s to %s (once)", path, final)
        _convert(path, tmp, dtype)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its finished folder into place first: use that one.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

"""Hub IDs as --model: a fake huggingface_hub cache (blobs, snapshot symlinks, refs), read offline; nothing is
ever downloaded. Loading through the cache must give exactly the logits of loading the same files from a folder."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoConfig, AutoModelForCausalLM

import qlora_kit as qk
from qlora_kit import defaults, hub
from qlora_kit.cli import main

from .conftest import token_batch

COMMIT_A, COMMIT_B, COMMIT_P = "a" * 40, "b" * 40, "c" * 40


def put_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> None:
    """One revision of `repo` laid out as huggingface_hub caches it: content-addressed blobs, the snapshot's
    files as relative symlinks to them, and refs/<branch> holding the commit hash (no newline)."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / sha).write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", sha))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def hub_setup(run_model, tmp_path_factory):
    """(cache, folder of main, folder of branch v2): org/name at main is run_model; v2 has other weights."""
    other = tmp_path_factory.mktemp("other_weights")
    for f in run_model.iterdir():  # the tokenizer and config of run_model ...
        shutil.copy(f, other / f.name)
    torch.manual_seed(1)  # ... and different random weights
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_model)).save_pretrained(other)
    cache = tmp_path_factory.mktemp("hf_cache")
    put_snapshot(cache, "org/name", COMMIT_A, folder_files(run_model), refs=("main",))
    put_snapshot(cache, "org/name", COMMIT_B, folder_files(other), refs=("v2",))
    put_snapshot(cache, "org/pickled", COMMIT_P, {"config.json": (run_model / "config.json").read_bytes(),
                                                  "pytorch_model.bin": b"never unpickled"}, refs=("main",))
    return cache, run_model, other


@pytest.fixture
def offline_cache(hub_setup, monkeypatch):
    cache = hub_setup[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_setup


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def test_hub_id_shape_and_a_local_path_wins(tmp_path, monkeypatch):
    for s in ("org/name", "org/Llama-3.1-8B", "org/name@main", "org/name@" + COMMIT_A, "org/name@refs/pr/1"):
        assert hub.is_hub_id(s), s
    for s in ("name", "a/b/c", "org/name@", "./x", "../x/y", "/abs/path", "org--x/y", "runs/m.gguf",
              "examples/llama.json", Path("org/name"), "smollm2-135m"):
        assert not hub.is_hub_id(s), s
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("org/name") and hub.is_hub_id("org/name@v2")
    assert hub.split_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")


@pytest.mark.parametrize("rev, which", [("", "main"), ("@" + COMMIT_A, "main"), ("@main", "main"),
                                        ("@v2", "v2"), ("@" + COMMIT_B, "v2")])
def test_load_by_hub_id_equals_loading_the_folder(offline_cache, rev, which):
    _, main_dir, v2_dir = offline_cache
    folder = main_dir if which == "main" else v2_dir
    model = qk.load_quantized("org/name" + rev, quant="nf4")
    assert torch.equal(logits(model), logits(qk.load_quantized(folder, quant="nf4")))
    assert Path(model.qlora_source["path"]).parent.parent.name == "models--org--name"
    # the revision chose the weights: the other one's logits differ
    other = v2_dir if which == "main" else main_dir
    assert not torch.allclose(logits(model), logits(qk.load_quantized(other, quant="nf4")))


def test_a_local_folder_shadows_the_cache(offline_cache, tmp_path, monkeypatch):
    _, _, v2_dir = offline_cache
    monkeypatch.chdir(tmp_path)
    shutil.copytree(v2_dir, tmp_path / "org" / "name")  # org/name in the cache is main's weights
    model = qk.load_quantized("org/name", quant="nf4")
    assert model.qlora_source["path"] == "org/name" and "name" not in model.qlora_source
    assert torch.equal(logits(model), logits(qk.load_quantized(v2_dir, quant="nf4")))


def test_adapter_records_the_hub_id_and_the_tokenizer_resolves(offline_cache, tmp_path):
    model = qk.load_quantized("org/name@v2", quant="nf4")
    qk.add_lora(model, r=4)
    qk.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/name@v2"
    assert defaults.model_name("org/name@v2") == "org/name@v2"
    assert defaults.model_name(str(offline_cache[1])) == str(offline_cache[1])
    from qlora_kit.loading import load_tokenizer
    tok = load_tokenizer(defaults.model_folder("org/name"))
    assert tok("ROMEO:").input_ids == load_tokenizer(offline_cache[1])("ROMEO:").input_ids


def test_cli_memory_and_eval_by_hub_id(offline_cache, text_file, capsys):
    assert main(["memory", "--model", "org/name", "--device", "cpu", "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["estimate"]["total"] > 0
    assert main(["eval", "--model", "org/name@v2", "--data", str(text_file), "--seq-len", "32",
                 "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_cli_not_cached_is_one_line_naming_both_places(offline_cache, capsys):
    cache = offline_cache[0]
    assert main(["eval", "--model", "org/missing", "--data", "shakespeare", "--device", "cpu"]) == 2
    err = one_error_line(capsys)
    assert err.startswith("qlora-kit eval: error: org/missing: no such local folder, and not in the Hugging Face "
                          f"cache at {cache}")
    assert "hf download org/missing" in err and "HF_HUB_OFFLINE" in err


def test_cli_unknown_revision_is_one_line_naming_it(offline_cache, capsys):
    assert main(["memory", "--model", "org/name@nope", "--device", "cpu"]) == 2
    err = one_error_line(capsys)
    assert "org/name@nope: revision 'nope' is not in the Hugging Face cache" in err
    assert "cached: main, v2" in err and "--revision nope" in err


def test_pickled_only_snapshot_is_refused(offline_cache):
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin: pickled weights are never loaded"):
        qk.load_quantized("org/pickled")


REPO_FILES = ["config.json", "generation_config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
              "training_args.bin", "model.pt", "weights.pth", "model.ckpt", "original/consolidated.00.pth",
              "original/model.safetensors", "onnx/model.onnx", "README.md", ".gitattributes", "model.gguf"]


@pytest.mark.parametrize("model, files, revision", [("org/name@v1", hub.MODEL_FILES, "v1"),
                                                    ("org/name", hub.CONFIG_FILES, None)])
def test_online_fetch_asks_for_the_needed_files_only(monkeypatch, tmp_path, model, files, revision):
    """What is checked is our request to huggingface_hub (its own pattern filter applied), not a download."""
    seen, fetched = {}, set()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}

    def fake_snapshot_download(repo_id, **kwargs):  # "downloads" what the patterns select, as empty files
        seen.update(kwargs, repo_id=repo_id)
        for name in filter_repo_objects(REPO_FILES, allow_patterns=kwargs["allow_patterns"],
                                        ignore_patterns=kwargs["ignore_patterns"]):
            fetched.add(name)
            (tmp_path / name).write_text(json.dumps(index) if name.endswith("index.json") else "")
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.hub_snapshot(model, files=files) == tmp_path
    assert seen["repo_id"] == "org/name" and seen["revision"] == revision
    assert seen["local_files_only"] is False and Path(seen["cache_dir"]) == tmp_path / "cache"
    expected = {"config.json"} if files == hub.CONFIG_FILES else {  # the index's shards, not consolidated.*
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"}
    assert fetched == expected
    # and whatever the allow-list says, pickled files are refused by the ignore patterns alone
    assert not set(filter_repo_objects(REPO_FILES, ignore_patterns=seen["ignore_patterns"])) & {
        f for f in REPO_FILES if f.endswith((".bin", ".pt", ".pth", ".ckpt"))}


def test_offline_passes_local_files_only(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: seen.update(kw) or str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_snapshot("org/name")
    assert seen["local_files_only"] is True


def hub_error(cls, message="boom"):
    """A huggingface_hub HTTP error without an HTTP response: only its type and message matter here."""
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


@pytest.mark.parametrize("error, kind, match", [
    (lambda: hub_error(hub.RevisionNotFoundError), FileNotFoundError,
     "org/name@v9: no revision 'v9' of org/name on the Hugging Face Hub"),
    (lambda: hub_error(hub.GatedRepoError), ValueError, "org/name@v9: a gated repo; accept its terms on "
                                                        "https://huggingface.co/org/name"),
    (lambda: hub_error(hub.RepositoryNotFoundError), FileNotFoundError,
     "org/name@v9: no such local folder, and no such model on the Hugging Face Hub"),
    (lambda: hub_error(hub.HfHubHTTPError, "500 Server\nError"), ValueError,
     r"org/name@v9: cannot fetch it from the Hugging Face Hub \(500 Server Error\)"),
    (lambda: hub_error(hub._INCOMPLETE), FileNotFoundError, "org/name@v9: the cached snapshot in .* is incomplete"),
    (lambda: hub.LocalEntryNotFoundError("cannot find"), FileNotFoundError,
     "org/name@v9: no such local folder; the Hugging Face Hub could not be reached"),
])
def test_online_errors_are_one_line_naming_the_model(monkeypatch, tmp_path, error, kind, match):
    if "incomplete" in match and hub._INCOMPLETE == ():
        pytest.skip("this huggingface_hub has no IncompleteSnapshotError")
    def failing(repo_id, **kwargs):
        raise error()

    monkeypatch.setattr(hub, "snapshot_download", failing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(kind, match=match) as info:
        hub.hub_snapshot("org/name@v9")
    assert "\n" not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__

"""Loader: a model directory as users have them (relative paths, Hugging Face cache snapshots and
copies of them, unreadable files, files where a directory belongs and back): each loads, or says what
is wrong and what to do."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from checkpoints import make_checkpoint

import infinitehip

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
def test_error_broken_link_in_a_copied_hub_snapshot(ckpt, tmp_path, name):
    """A Hugging Face cache snapshot copied with `cp -r` holds links to ../../blobs that no longer
    resolve: load said "has no config.json" while `ls` lists it, and a broken tokenizer_config.json
    was skipped in silence (no chat template, no BOS/EOS). Now: which link, and what to do."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for f in ckpt.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(blobs / f.name)
    (blobs / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{name} is a broken symbolic link .*copy the model with cp -L"):
        infinitehip.load(snapshot, config="tiny")


def test_error_a_file_where_a_directory_is_expected_and_back(ckpt, tmp_path):
    """A weights file given as the model: "has no config.json". A directory named like a side
    file: skipped in silence (here the chat template with it)."""
    with pytest.raises(NotADirectoryError, match="model.safetensors is a file.*give the directory that holds it"):
        infinitehip.load(ckpt / "model.safetensors")
    path = shutil.copytree(ckpt, tmp_path / "m")
    (path / "tokenizer_config.json").unlink()
    (path / "tokenizer_config.json").mkdir()
    with pytest.raises(IsADirectoryError, match="tokenizer_config.json is a directory, not a file"):
        infinitehip.load(path, config="tiny")


@contextlib.contextmanager
def _unprivileged():
    """Run the block as a user that file permissions apply to (root reads any file)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_error_unreadable_weights_say_permission_not_corrupt(ckpt):
    """safetensors reports a file it may not open as "No such file or directory", and load said
    "the file may be truncated or corrupt, re-download it"."""
    path = Path(tempfile.mkdtemp(prefix="infinitehip-perm-"))   # pytest's tmp_path is private to its user
    try:
        path.chmod(0o755)
        for f in ckpt.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
            (path / f.name).chmod(0o644)
        (path / "model.safetensors").chmod(0)
        with _unprivileged(), pytest.raises(PermissionError, match="model.safetensors: permission denied.*chmod"):
            infinitehip.load(path, config="tiny")
    finally:
        shutil.rmtree(path)


def test_model_name_of_a_relative_path_and_of_a_hub_snapshot(ckpt, tmp_path, monkeypatch):
    """`infinitehip serve .` served the model id "" (Path(".").name); a Hugging Face cache
    snapshot is served as its commit hash: now the directory's name, and the hub's org/name. A
    hub id, or the cache folder instead of its snapshot: "does not exist", "has no config.json"."""
    monkeypatch.chdir(ckpt)
    assert infinitehip.load(".", config="tiny").name == "llama"
    repo = tmp_path / "models--org--Tiny-Llama"
    for commit in ("0123abcd", "4567ef01"):
        shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert infinitehip.load(repo / "snapshots" / "0123abcd", config="tiny").name == "org/Tiny-Llama"
    with pytest.raises(FileNotFoundError, match="Hugging Face cache folder: give a snapshot of it, e.g. .*0123abcd$"):
        infinitehip.load(repo)
    with pytest.raises(FileNotFoundError, match="does not exist; if org/Tiny-Llama is a Hugging Face hub id, "
                                                "download it first \\(hf download org/Tiny-Llama --local-dir DIR\\)"):
        infinitehip.load("org/Tiny-Llama")

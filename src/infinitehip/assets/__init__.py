"""Files shipped with the package: the built-in model and the eval haystack; reading a model
directory's JSON files."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

BUILTIN_NAME = "builtin"


def builtin_model_path() -> Path:
    """Directory of the built-in model (HF format: config.json, model.safetensors, tokenizer.json)."""
    return Path(str(resources.files("infinitehip").joinpath("assets", BUILTIN_NAME)))


def resolve_model_path(name_or_path: str) -> str:
    """``"builtin"`` -> the built-in model's directory; anything else unchanged."""
    return str(builtin_model_path()) if name_or_path == BUILTIN_NAME else name_or_path


def model_file(directory: Path, name: str) -> Path | None:
    """``directory / name`` if it is a file, None if there is nothing by that name. Something
    else in its place is an error, not an absent file: a link whose target is gone (a Hugging
    Face cache snapshot copied without its ``blobs``, whose files are links into it) or a directory."""
    file = directory / name
    if file.is_file():
        return file
    if file.is_dir():
        raise IsADirectoryError(f"{file} is a directory, not a file; the model directory holds the file itself")
    if file.is_symlink():
        raise FileNotFoundError(f"{file} is a broken symbolic link (to {os.readlink(file)}): the model directory "
                                "was copied without the files its links point to (a Hugging Face cache snapshot "
                                "links into ../../blobs); copy the model with cp -L, which copies the files, or "
                                "download it again")
    return None


def read_json(file: Path) -> dict:
    """A model directory's JSON file (config.json, generation_config.json, ...); malformed: a
    ValueError that names it."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object of settings: is it the right file?")
    return data


def read_optional_json(directory: Path, name: str) -> dict:
    """A model directory's optional JSON file (generation_config.json, tokenizer_config.json, ...),
    or {} where there is none."""
    file = model_file(directory, name)
    return read_json(file) if file else {}

"""Where models come from when none is named: the GGUF bundled in the package, if this install has one."""

from __future__ import annotations

from pathlib import Path

from .errors import TiblocalError

DATA_DIR = Path(__file__).parent / "data"
BUNDLED_MODEL = DATA_DIR / "tiblocal-demo.gguf"


def default_model() -> Path:
    if BUNDLED_MODEL.is_file():
        return BUNDLED_MODEL
    raise TiblocalError(
        f"no model given and this install has no bundled model ({BUNDLED_MODEL}); "
        "pass the path of a .gguf model, e.g. `tiblocal chat model.gguf`"
    )


def resolve_model(model: Path | str | None) -> Path:
    """The model a command was given: a path; None or 'bundled' (unless a file of that name is here) is the bundled
    model, as 'bundled' names the bundled tokenizer."""
    if model is None or (str(model) == "bundled" and not Path(model).exists()):
        return default_model()
    return Path(model)

"""The one exception family of tiblocal.

Library code raises these with a message a person can act on: the file, the bad value, what was
expected and the fix. Only the CLI turns them into one line on stderr and exit status 1.
"""

from __future__ import annotations


class TiblocalError(Exception):
    """A user or data error: bad input, a file that is not what it should be, an impossible request."""


class InputFileError(TiblocalError):
    """A file given by the user is missing, unreadable or malformed."""


class ModelFormatError(InputFileError):
    """A model file (GGUF, safetensors, tokenizer) is not valid or not supported."""


class EngineError(TiblocalError):
    """The inference engine could not do what was asked (load, GPU offload, context size)."""


class PromptTooLongError(EngineError):
    """A prompt does not fit the context window."""

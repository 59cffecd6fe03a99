"""llama.cpp's C API through llama-cpp-python's ctypes layer, without the rest of that package.

tiblocal calls the C API directly (``llama_cpp.llama_cpp``: model loading, decode, samplers, the quantizer).
``import llama_cpp`` also imports the package's high-level half (``llama_cpp.llama``: the chat formats, jinja2,
the disk cache), about 0.11 s of the start of each command that runs llama.cpp, on 2 cores (the two imports timed
after numpy, gguf and rich, medians of 15), for code tiblocal never calls. The package's ``__init__`` only
re-exports the two halves, so the ctypes layer is imported here under its own name with that ``__init__`` left
out. It stays registered as ``llama_cpp.llama_cpp``: a later ``import llama_cpp`` in the same process (a test, a
user's script) runs the real ``__init__``, which reuses this module, so the process has one set of ctypes types and
one loaded library. Should a later llama-cpp-python's ctypes layer need its package's ``__init__``, the package is
imported as usual instead.

llama.cpp's log goes to stderr only when asked (``verbose``), as llama-cpp-python does with its own callback; its
error lines are kept, so that a failed call can say why (``take_errors``).

On Linux the process's C++ runtime (libstdc++) is put in the global symbol scope before llama.cpp's libraries load
(``share_cxx_runtime``). A CUDA build of llama-cpp-python can ship a ``libggml-cuda.so`` that carries and exports its
own copy of libstdc++'s internals (std::locale, the stream inserters): on the H100 host the toolchain linked
``libstdc++.a`` into it. libllama then binds its C++ calls to that copy, while the locale data they use were set up
by the libstdc++ that sentencepiece (through gguf) or torch loaded first: llama.cpp's first ``std::stringstream``
(printing the model's hyperparameters) crashed every model load there, and torch imported after such a build
aborted in its own stringstream. With libstdc++ global, every library binds to one runtime whatever came first.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import sys
from collections import deque
from types import ModuleType

from .errors import EngineError

_lib: ModuleType | None = None
_verbose = False
_log_callback = None  # the ctypes callback object; llama.cpp keeps a raw pointer to it, so it must stay alive
_errors: deque[str] = deque(maxlen=64)  # llama.cpp's error lines since the last take_errors()
_ERROR, _CONT = 4, 5  # ggml.h's ggml_log_level: GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT (continues a line)


def load(verbose: bool = False) -> ModuleType:
    """The ctypes layer (``llama_cpp.llama_cpp``), imported and the backend initialised once per process."""
    global _lib, _verbose
    _verbose = verbose
    # llama-cpp-python's own callback, should it be installed again later, reads this logger's level.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    if _lib is None:
        share_cxx_runtime()
        try:
            lib = _import_ctypes_layer()
        except (ImportError, OSError) as e:
            raise EngineError(
                f"llama-cpp-python is not installed or does not load ({e}); pip install llama-cpp-python"
            ) from None
        _install_log_callback(lib)  # before the backend starts: a GPU backend logs its devices
        lib.llama_backend_init()
        _lib = lib
    else:  # again: importing llama_cpp's high-level half (a test, a user's script) installs its own callback
        _install_log_callback(_lib)
    return _lib


def share_cxx_runtime() -> None:
    """Put libstdc++ in the process's global symbol scope (Linux): loaded now, or promoted if a module loaded it.

    Libraries loaded afterwards (llama.cpp's, torch's) then bind their C++ runtime calls to it before any private
    copy a library of theirs exports. Not an error where there is no libstdc++ (musl, libc++ systems)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
    except OSError:
        pass


def _import_ctypes_layer() -> ModuleType:
    name = "llama_cpp.llama_cpp"
    if name in sys.modules:
        return sys.modules[name]
    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("No module named 'llama_cpp'")
        before = set(sys.modules)
        shell = importlib.util.module_from_spec(spec)  # the package object, its __init__ not run
        sys.modules["llama_cpp"] = shell
        try:
            return importlib.import_module(name)
        except Exception:  # a layout this shortcut does not know: forget what it loaded, import the package as usual
            for m in set(sys.modules) - before:
                if m == "llama_cpp" or m.startswith("llama_cpp."):
                    del sys.modules[m]
        finally:
            if sys.modules.get("llama_cpp") is shell:
                del sys.modules["llama_cpp"]
    importlib.import_module("llama_cpp")
    return importlib.import_module(name)


def take_errors() -> str:
    """llama.cpp's error log since the last call, on one line; empty when it logged none."""
    text = "".join(_errors)
    _errors.clear()
    lines = (line.strip(" -").removeprefix("ERROR: ") for line in text.splitlines())
    return " ".join(line for line in lines if line and set(line) != {"="})


def _install_log_callback(lib: ModuleType) -> None:
    global _log_callback
    if _log_callback is not None:
        lib.llama_log_set(_log_callback, None)
        return
    level_of_line = [0]

    def log(level: int, text: bytes, user_data) -> None:
        if level != _CONT:
            level_of_line[0] = level
        if level_of_line[0] == _ERROR:
            _errors.append(text.decode("utf-8", errors="replace"))
        if _verbose:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()

    _log_callback = lib.llama_log_callback(log)
    lib.llama_log_set(_log_callback, None)

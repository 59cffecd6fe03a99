"""tiblocal's GGUF conventions, beside gguf-py's ``Keys``: every metadata key tiblocal reads or writes that gguf-py does
not define is named here once (gguf-py's own, such as ``Keys.IMatrix.DATASETS`` and ``Keys.General.SAMPLING_TEMP``,
are used from gguf-py directly).

- ``tiblocal.rotation.seed``: the seeds of the rotations `tiblocal quantize --rotate` applied, in order, in a model
  GGUF and in an importance matrix measured in that basis (runtimes ignore keys they do not know);
- ``tiblocal.imatrix.rotated``: in every importance matrix tiblocal writes, whether it was measured in a rotated basis;
- ``quantize.imatrix.*``: what llama.cpp's quantizer records about the importance matrix a GGUF was quantized with
  (llama.cpp's ``LLM_KV_QUANTIZE_IMATRIX_*``; gguf-py has no constants for them);
- ``general.sampling.*``: the sampling a model suggests (gguf-py's ``Keys.General.SAMPLING_*``), read as one group.
"""

from __future__ import annotations

ROTATION_SEED = "tiblocal.rotation.seed"
IMATRIX_ROTATED = "tiblocal.imatrix.rotated"

QUANTIZE_IMATRIX_PREFIX = "quantize.imatrix."
QUANTIZE_IMATRIX_FILE = QUANTIZE_IMATRIX_PREFIX + "file"
QUANTIZE_IMATRIX_DATASET = QUANTIZE_IMATRIX_PREFIX + "dataset"
QUANTIZE_IMATRIX_ENTRIES = QUANTIZE_IMATRIX_PREFIX + "entries_count"
QUANTIZE_IMATRIX_CHUNKS = QUANTIZE_IMATRIX_PREFIX + "chunks_count"

SAMPLING_PREFIX = "general.sampling."


def suggested_sampling(metadata: dict) -> dict:
    """The model's suggested sampling from a GGUF's metadata, by the keys' last part (temp, top_k, top_p, ...)."""
    return {k.removeprefix(SAMPLING_PREFIX): v for k, v in metadata.items() if k.startswith(SAMPLING_PREFIX)}

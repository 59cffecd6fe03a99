"""benchmarks/bench_q8_rotate.py: the dequantized reference holds the quantized file's values, and the run completes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

from conftest import DATA

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_dequantized_copy_holds_the_quantized_values_and_the_bench_runs(tiny_gguf, tmp_path):
    from bench_q8_rotate import dequantized_copy

    from tiblocal.gguf_file import read_gguf
    from tiblocal.quantize.gguf_quant import quantize_gguf

    (q,) = quantize_gguf(tiny_gguf, tmp_path / "q4.gguf", ["Q4_K_M"])
    dequantized_copy(q.path, tmp_path / "deq.gguf")
    info = read_gguf(tmp_path / "deq.gguf")
    assert info.file_type == "F16" and info.vocab_size == read_gguf(q.path).vocab_size
    src = {t.name: t for t in gguf.GGUFReader(q.path).tensors}
    n = 0
    for t in gguf.GGUFReader(tmp_path / "deq.gguf").tensors:
        want = np.asarray(gguf.quants.dequantize(src[t.name].data, src[t.name].tensor_type), np.float32)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            want = want.astype(np.float16)
            n += src[t.name].tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
        assert np.array_equal(np.asarray(t.data).reshape(-1), want.reshape(-1)), t.name
    assert n >= 2 * 7  # every quantized matrix came back

    p = subprocess.run([sys.executable, str(BENCH / "bench_q8_rotate.py"), "--model", str(q.path), "--text",
                        str(DATA / "tibetan_sample.txt"), "--max-windows", "2", "--seeds", "2", "--trials", "2",
                        "--threads", "2", "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    table = [line for line in p.stdout.splitlines() if line.startswith("| Q8_0")]
    assert len(table) == 4 and "--rotate-trials 2" in table[-1]
    assert sorted(x.name for x in (tmp_path / "w").iterdir()) == ["reference-f16.gguf"]

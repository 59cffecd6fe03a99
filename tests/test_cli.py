"""The `tiblocal` command as a user runs it: help, exit codes, JSON output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import run_cli
from tiblocal.cli import VERBS


def _one_line_error(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tiblocal: error: ")
    return lines[0]


def test_top_level_help_lists_every_verb() -> None:
    p = run_cli("--help")
    assert p.returncode == 0
    for verb in VERBS:
        assert verb.name in p.stdout.decode()


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_every_verb_has_help(verb: str) -> None:
    p = run_cli(verb, "--help")
    assert p.returncode == 0, p.stderr
    assert f"usage: tiblocal {verb}" in p.stdout.decode()


def _options(parser) -> dict[str, list[tuple]]:
    sub = next(a for a in parser._actions if a.dest == "verb")  # argparse's subparsers action
    return {name: sorted((tuple(a.option_strings), a.dest, repr(a.default)) for a in p._actions)
            for name, p in sub.choices.items()}


def test_a_verb_alone_is_set_up_as_in_the_whole_parser() -> None:
    """main sets up only the verb it is given; that verb's options are exactly those of the whole command line."""
    from tiblocal.cli import build_parser

    whole = _options(build_parser())
    for v in VERBS:
        alone = _options(build_parser(only=v.name))
        assert alone[v.name] == whole[v.name]
        assert all(len(opts) == 1 for name, opts in alone.items() if name != v.name)  # just -h
    assert all(len(opts) == 1 for opts in _options(build_parser(only="")).values())
    # main finds the verb as the first argument without a dash: that holds while no top-level option takes a value
    assert all(a.nargs == 0 for a in build_parser()._actions if a.option_strings)


def test_a_verb_that_needs_no_runtime_does_not_import_it() -> None:
    import subprocess
    import sys

    code = ("import sys; from tiblocal.cli import main\n"
            "try: main(['verify', '--help'])\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in ('tiblocal.engine', 'llama_cpp', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_usage_errors_exit_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("fly").returncode == 2
    assert run_cli("generate", "x.gguf").returncode == 2  # neither --prompt nor --file
    assert run_cli("chat", "--temp", "hot").returncode == 2


def test_generate_prompt_prints_text_and_json(tiny_gguf) -> None:
    p = run_cli("generate", str(tiny_gguf), "--prompt", "བཀྲ་ཤིས་", "--max-tokens", "12", "--seed", "5")
    assert p.returncode == 0, p.stderr
    text = p.stdout.decode()
    p = run_cli("generate", str(tiny_gguf), "--prompt", "བཀྲ་ཤིས་", "--max-tokens", "12", "--seed", "5", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["text"] + "\n" == text
    assert rec["completion_tokens"] <= 12 and rec["prompt_tokens"] > 3
    assert rec["stop_reason"] in ("length", "eos", "stop")
    for key in ("prompt_ms", "gen_ms", "tokens_per_s", "first_token_ms"):
        assert rec[key] >= 0
    # the cut in llama.cpp's graph changes no choice
    p = run_cli("generate", str(tiny_gguf), "--prompt", "བཀྲ་ཤིས་", "--max-tokens", "12", "--seed", "5",
                "--backend-sampling")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == text


def test_generate_file_txt_and_jsonl_to_out(tiny_gguf, tmp_path: Path) -> None:
    txt = tmp_path / "prompts.txt"
    txt.write_text("བཀྲ་ཤིས་\n\nHello\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    p = run_cli("generate", str(tiny_gguf), "--file", str(txt), "--out", str(out), "--max-tokens", "6", "--temp", "0")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in recs] == ["བཀྲ་ཤིས་", "Hello"]
    assert [r["index"] for r in recs] == [0, 1]

    jl = tmp_path / "prompts.jsonl"
    jl.write_text(
        json.dumps({"instruction": "ཚིག", "input": "བོད"}, ensure_ascii=False) + "\n" + json.dumps({"prompt": "Hi"}) + "\n",
        encoding="utf-8",
    )
    p = run_cli("generate", str(tiny_gguf), "--file", str(jl), "--max-tokens", "4", "--temp", "0")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(l) for l in p.stdout.decode().splitlines()]
    assert [r["prompt"] for r in recs] == ["ཚིག\nབོད", "Hi"]

    # an existing --out is kept unless --force
    before = out.read_bytes()
    line = _one_line_error(run_cli("generate", str(tiny_gguf), "--file", str(txt), "--out", str(out)))
    assert "already exists; pass --force" in line
    assert out.read_bytes() == before


def test_generate_from_stdin(tiny_gguf) -> None:
    p = run_cli("generate", str(tiny_gguf), "--file", "-", "--max-tokens", "3", input="one\ntwo\n".encode())
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.decode().splitlines()) == 2


def test_missing_model_file(tmp_path: Path) -> None:
    line = _one_line_error(run_cli("generate", str(tmp_path / "nope.gguf"), "--prompt", "x"))
    assert "nope.gguf: no such file" in line


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    line = _one_line_error(run_cli("chat", str(bad)))
    assert "is not a GGUF file (it starts with b'this'" in line and "tiblocal convert" in line


def test_truncated_gguf(tiny_gguf, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    line = _one_line_error(run_cli("generate", str(cut), "--prompt", "x"))
    assert "is truncated" in line and "download or convert it again" in line
    # cut inside the header too
    cut.write_bytes(data[:5000])
    line = _one_line_error(run_cli("inspect", str(cut)))
    assert "truncated" in line


def test_header_cut_inside_the_vocabulary(tiny_gguf, tmp_path: Path) -> None:
    """A file cut anywhere inside the token list is reported truncated, whether the tokens are kept or skipped."""
    from tiblocal.errors import ModelFormatError
    from tiblocal.gguf_file import read_gguf

    data = tiny_gguf.read_bytes()
    full = read_gguf(tiny_gguf)
    assert read_gguf(tiny_gguf, with_tokens=False).tokens == [""] * len(full.tokens)
    start = data.index(b"tokenizer.ggml.tokens")
    end = data.index(full.tokens[-1].encode(), start) + len(full.tokens[-1].encode())
    cut = tmp_path / "cut.gguf"
    for at in (start + 40, (start + end) // 2, end - 1):
        cut.write_bytes(data[:at])
        for keep in (True, False):
            with pytest.raises(ModelFormatError, match="is truncated: its header ends early"):
                read_gguf(cut, with_tokens=keep)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _one_line_error(run_cli("chat", str(path)))
    assert "has architecture 'gpt2'; tiblocal runs llama models" in line


def test_gpu_layers_without_gpu_build(tiny_gguf) -> None:
    from tiblocal.engine import gpu_offload_supported

    if gpu_offload_supported():
        pytest.skip("this llama-cpp-python build has a GPU backend")
    line = _one_line_error(run_cli("generate", str(tiny_gguf), "--prompt", "x", "--n-gpu-layers", "99"))
    assert "no GPU backend" in line and "GGML_CUDA=on" in line


def test_prompt_longer_than_context(tiny_gguf, tmp_path: Path) -> None:
    long = "བཀྲ་ཤིས་བདེ་ལེགས། " * 120
    line = _one_line_error(run_cli("generate", str(tiny_gguf), "--prompt", long, "--ctx", "256"))
    assert "tokens but the context holds 256" in line
    # in a file, the other prompts are still answered; the long one is reported
    f = tmp_path / "p.txt"
    f.write_text("short\n" + long + "\n", encoding="utf-8")
    p = run_cli("generate", str(tiny_gguf), "--file", str(f), "--ctx", "256", "--max-tokens", "3")
    assert p.returncode == 1
    recs = [json.loads(l) for l in p.stdout.decode().splitlines()]
    assert "text" in recs[0] and "context holds 256" in recs[1]["error"]
    assert "prompt 1" in p.stderr.decode() and "line 2" in p.stderr.decode()


def test_prompts_file_with_invalid_utf8(tiny_gguf, tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes("ok\n".encode() + b"bad \xff\xfe line\n")
    line = _one_line_error(run_cli("generate", str(tiny_gguf), "--file", str(f)))
    assert "p.txt line 2 is not valid UTF-8 (byte 0xff at column 5)" in line


def test_invalid_utf8_on_stdin_for_generate(tiny_gguf) -> None:
    line = _one_line_error(run_cli("generate", str(tiny_gguf), "--file", "-", input=b"\xe0\xbd\n"))
    assert "<stdin> line 1 is not valid UTF-8" in line


def test_bad_jsonl_rows(tiny_gguf, tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"instruction": "a"}\n{"instruction": \n', encoding="utf-8")
    assert "p.jsonl line 2 is not valid JSON" in _one_line_error(run_cli("generate", str(tiny_gguf), "--file", str(f)))
    f.write_text('{"text": "a"}\n', encoding="utf-8")
    assert 'expected a non-empty "instruction"' in _one_line_error(run_cli("generate", str(tiny_gguf), "--file", str(f)))


def test_no_model_and_no_bundled_model(tmp_path, monkeypatch, capsys) -> None:
    from tiblocal import models
    from tiblocal.cli import main

    monkeypatch.setattr(models, "BUNDLED_MODEL", tmp_path / "absent.gguf")  # an install without the demo model
    assert main(["generate", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model given and this install has no bundled model" in err


def test_inspect_gguf_json(tiny_gguf) -> None:
    p = run_cli("inspect", str(tiny_gguf), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["architecture"] == "llama" and d["file_type"] == "ALL_F32"
    assert d["vocab_size"] == 700 and d["token_types"]["BYTE"] == 256
    assert d["special_ids"] == {"bos": 1, "eos": 2, "unk": 0}
    assert d["chat_template_name"] == "alpaca"
    assert d["hyperparameters"]["block_count"] == 2 and d["n_params"] == 171_840
    assert d["tensor_types"] == {"F32": 21}


def test_inspect_hf_folder(tiny_hf) -> None:
    p = run_cli("inspect", str(tiny_hf), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["format"] == "huggingface" and d["embedding_rows"] == 700
    assert d["tokenizer"]["sentencepiece_pieces"] == 700
    p = run_cli("inspect", str(tiny_hf))
    assert p.returncode == 0 and "LlamaForCausalLM" in p.stdout.decode()


def test_inspect_missing_path(tmp_path: Path) -> None:
    assert "no such file or folder" in _one_line_error(run_cli("inspect", str(tmp_path / "x")))


def test_inspect_and_check_take_bundled_and_agree_on_the_vocabulary(tiny_hf, tmp_path) -> None:
    """`bundled` names the bundled model for inspect and check, as it names the bundled tokenizer elsewhere; both count
    a tokenizer.json's ids the same way (inspect counted the added special tokens twice); inspect shows the sampling
    the model suggests."""
    from tiblocal.check import check_hf
    from tiblocal.inspect_model import describe_hf

    p = run_cli("inspect", "bundled", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["name"] == "tiblocal-demo" and d["suggested_sampling"]["temp"] == pytest.approx(0.8)
    p = run_cli("check", "bundled", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["problems"] == []
    import shutil

    from tiblocal.vocab import write_tokenizer_json

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    write_tokenizer_json(folder)  # its added_tokens repeat the vocabulary's special pieces
    facts, _ = check_hf(folder)
    assert describe_hf(folder)["tokenizer"]["tokenizer_json_vocab"] == facts["tokenizer_json_vocab"]
    assert facts["tokenizer_json_vocab"] == facts["tokenizer_pieces"]


def test_tables_written_to_a_pipe_keep_their_numbers() -> None:
    """Piped or logged (no terminal, no COLUMNS), rich laid tables out for 80 columns and cut the long cells."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    p = subprocess.run([sys.executable, "-m", "tiblocal", "inspect", "bundled"], capture_output=True, env=env)
    assert p.returncode == 0
    assert "temp 0.8, top_k 40, top_p 0.9, penalty_repeat 1.1" in p.stdout.decode()


def test_pretrain_and_sft_help_show_their_own_example() -> None:
    assert "e.g. tiny-sft" in run_cli("sft", "--help").stdout.decode()
    assert "e.g. tiny-pretrain" in run_cli("pretrain", "--help").stdout.decode()


def test_every_option_has_help() -> None:
    import argparse

    from tiblocal.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif not action.help and action.dest != "help":
                missing.append(f"{' '.join(prefix)} {action.option_strings or action.dest}")

    walk(build_parser(), [])
    assert not missing, missing

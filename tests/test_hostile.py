"""Hostile input and faults, through the CLI as a user meets them: one line on stderr and exit 1 (2 for usage), no
traceback, inputs byte-identical afterwards, nothing written outside the output, nothing half-written that looks
finished."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli


def one_line_error(proc, code: int = 1) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tiblocal: error: "), lines[0]
    return lines[0]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with its SHA-256: compared before and after a run, it shows an input changed or
    something appeared."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONIOENCODING="utf-8", NO_COLOR="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=full_env)


# --- the last resort ---------------------------------------------------------------------------------------------


def test_an_unexpected_exception_is_one_line_and_a_report_file(tmp_path) -> None:
    """A bug (here a verb's function raising a TypeError) gives one line naming the report that holds the traceback,
    exit 1; under --json a JSON error object on stdout too."""
    code = (
        "import sys, tiblocal.cli as c, tiblocal.commands as m\n"
        "def boom(o: m.InspectOptions): raise TypeError('unsupported operand\\ntwo lines')\n"
        "m.inspect = boom\n"
        "sys.exit(c.main(sys.argv[1:] or ['inspect', 'x.gguf', '--json']))\n"
    )
    p = run_python(code, env={"XDG_CACHE_HOME": str(tmp_path)})
    line = one_line_error(p)
    assert "unexpected TypeError in tiblocal inspect: unsupported operand two lines" in line
    reports = list((tmp_path / "tiblocal" / "crashes").glob("*.log"))
    assert len(reports) == 1 and str(reports[0]) in line
    text = reports[0].read_text()
    assert "Traceback" in text and "in boom" in text and "command: tiblocal inspect x.gguf --json" in text
    assert json.loads(p.stdout) == {"error": line.removeprefix("tiblocal: error: ")}


def test_a_verb_whose_module_fails_to_load_is_one_line_too(tmp_path) -> None:
    """Setting up a verb's options imports its commands module: a failure there is reported like one in the verb."""
    code = (
        "import sys, tiblocal.cli as c\n"
        "v = next(v for v in c.VERBS if v.name == 'inspect')\n"
        "object.__setattr__(v, 'target', 'tiblocal.no_such_module:inspect')\n"
        "sys.exit(c.main(['inspect', 'x.gguf', '--json']))\n"
    )
    p = run_python(code, env={"XDG_CACHE_HOME": str(tmp_path)})
    line = one_line_error(p)
    assert "unexpected ModuleNotFoundError in tiblocal inspect: No module named 'tiblocal.no_such_module'" in line
    assert json.loads(p.stdout) == {"error": line.removeprefix("tiblocal: error: ")}


def test_tiblocal_warnings_show_and_libraries_warnings_do_not(tmp_path) -> None:
    """A library's warning (torchao saying which of its CUDA kernels it could not load) is noise to a user of the
    command; tiblocal's own warnings (a context beyond the trained one) are not."""
    code = (
        "import logging, sys, tiblocal.cli as c, tiblocal.commands as m\n"
        "def quiet(o: m.VerifyOptions):\n"
        "    logging.getLogger('torchao').warning('Failed to load a kernel')\n"
        "    logging.getLogger('tiblocal.engine').warning('--ctx 512 is beyond the 256 tokens')\n"
        "    logging.getLogger('torchao').error('a library error')\n"
        "    return 0\n"
        "m.verify = quiet\n"
        "sys.exit(c.main(['verify', '.']))\n"
    )
    p = run_python(code, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert p.stderr.decode().splitlines() == ["WARNING tiblocal.engine: --ctx 512 is beyond the 256 tokens",
                                              "ERROR torchao: a library error"]


def test_an_error_under_json_is_a_json_object_on_stdout(tmp_path) -> None:
    p = run_cli("inspect", str(tmp_path / "missing.gguf"), "--json")
    line = one_line_error(p)
    assert json.loads(p.stdout) == {"error": line.removeprefix("tiblocal: error: ")}


@pytest.mark.parametrize("module, package, argv", [
    ("torch", "torch", ["imatrix", "hf", "--out", "x.gguf"]),
    ("rouge_score", "rouge-score", ["eval", "tasks", "--task", "qa", "--data", "c.txt"]),
    ("google", "protobuf", ["vocab", "extend", "--base", "bundled", "--corpus", "c.txt", "--add", "20", "--out", "v"]),
])
def test_a_missing_extra_names_what_to_install(tmp_path, module, package, argv) -> None:
    """Without torch or protobuf (a laptop install), the verbs that need them say which extra installs them."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "import tiblocal.cli as c; sys.exit(c.main(sys.argv[1:]))\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "c.txt").write_text("བོད་ཀྱི་ལོ་རྒྱུས། ཡིག་ཆ་ཁག་གཅིག\n" * 400, encoding="utf-8")
    before = snapshot(tmp_path)
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    line = one_line_error(p)
    assert f"needs {package}, which is not installed" in line or f"{module} is not installed" in line
    assert f"pip install 'tiblocal[{'eval' if module == 'rouge_score' else 'train'}]'" in line
    assert snapshot(tmp_path) == before


# --- outputs that would destroy an input, or land outside the output -------------------------------------------


@pytest.fixture
def work(tmp_path, tiny_gguf, tiny_hf):
    """A copy of the tiny model as GGUF and as a Hugging Face folder, in a folder of its own."""
    import shutil

    root = tmp_path / "work"
    root.mkdir()
    shutil.copyfile(tiny_gguf, root / "m.gguf")
    shutil.copytree(tiny_hf, root / "hf")
    (root / "prompts.txt").write_text("one\ntwo\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("args", [
    ["generate", "m.gguf", "--prompt", "hi", "--out", "m.gguf", "--force"],
    ["generate", "m.gguf", "--prompt", "hi", "--out", "hf/../m.gguf", "--force"],
    ["generate", "m.gguf", "--prompt", "hi", "--out", "link.gguf", "--force"],  # a symlink to the model
    ["generate", "m.gguf", "--prompt", "hi", "--out", "hard.gguf", "--force"],  # a hard link to the model
    ["generate", "m.gguf", "--file", "prompts.txt", "--out", "prompts.txt", "--force"],
    ["quantize", "m.gguf", "--type", "Q8_0", "--out", "m.gguf", "--force"],
    ["quantize", "m.gguf", "--type", "Q8_0", "--out", "./m.gguf", "--force"],
    ["convert", "hf", "--out", "hf/model.gguf"],  # inside the input folder
    ["merge", "hf", "hf", "--out", "hf", "--force"],
    ["merge", "hf", "hf", "--out", ".", "--force"],  # contains the inputs
    ["release", "hf", "--out", "hf", "--force"],
    ["release", "hf", "--out", "rel", "--name", "../../escaped"],
    ["release", "hf", "--out", "rel", "--name", "a/b"],
    ["release", "hf", "--out", "rel", "--name", ".hidden"],
])
def test_an_output_that_would_destroy_an_input_or_escape_is_refused(work, args) -> None:
    (work / "link.gguf").symlink_to(work / "m.gguf")
    os.link(work / "m.gguf", work / "hard.gguf")
    before = snapshot(work.parent)
    line = one_line_error(run_cli(*args, cwd=work))
    assert "input" in line or "plain file name" in line, line
    assert snapshot(work.parent) == before


def test_an_existing_folder_as_a_file_output_is_refused(work) -> None:
    (work / "outdir").mkdir()
    line = one_line_error(run_cli("generate", "m.gguf", "--prompt", "hi", "--out", "outdir", "--force", cwd=work))
    assert "is a folder" in line


def test_verify_never_leaves_its_folder(tmp_path) -> None:
    """A SHA256SUMS naming ../ or an absolute path (or a link out of the folder) is refused, not read."""
    import hashlib as h

    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    digest = h.sha256(secret.read_bytes()).hexdigest()
    folder = tmp_path / "rel"
    folder.mkdir()
    for listed in ("../secret.txt", str(secret), "sub/../../secret.txt", "out.txt"):
        if listed == "out.txt":
            (folder / "out.txt").symlink_to(secret)
        (folder / "SHA256SUMS").write_text(f"{digest}  {listed}\n")
        line = one_line_error(run_cli("verify", str(folder)))
        assert "outside" in line and listed in line, line
    (folder / "SHA256SUMS").write_bytes(b"\xff\xfe not text\n")
    assert "not UTF-8" in one_line_error(run_cli("verify", str(folder)))
    (folder / "SHA256SUMS").write_text(f"{'z' * 64}  a\n")
    assert "is not 'SHA256  NAME'" in one_line_error(run_cli("verify", str(folder)))


# --- partials, races, faults -----------------------------------------------------------------------------------


def test_stale_partials_of_the_same_output_are_removed_and_said(work) -> None:
    """A run killed with SIGKILL leaves its partial; the next run for that output removes it (and says so), but not
    one whose writer still runs."""
    dead = work / ".out.jsonl.999999999-abcdef.partial"
    dead.write_text("half")
    old_style = work / ".out.jsonl.0a1b2c3d4e5f.partial"  # an earlier tiblocal's name, without a PID
    old_style.write_text("half")
    alive = work / f".out.jsonl.{os.getpid()}-abcdef.partial"
    alive.write_text("being written")
    other = work / ".other.jsonl.999999999-abcdef.partial"
    other.write_text("not ours")
    p = run_cli("generate", "m.gguf", "--file", "prompts.txt", "--out", "out.jsonl", "--max-tokens", "2", cwd=work)
    assert p.returncode == 0, p.stderr
    assert not dead.exists() and not old_style.exists() and alive.exists() and other.exists()
    assert "removed 2 partial outputs" in p.stderr.decode()


def test_a_second_writer_of_the_same_output_does_not_replace_the_first(tmp_path) -> None:
    """The name is taken at the end, atomically: if it appeared meanwhile (another run), this run refuses and the
    other's file stays."""
    from tiblocal.errors import TiblocalError
    from tiblocal.fsutil import atomic_write_text

    out = tmp_path / "out.jsonl"
    with pytest.raises(TiblocalError, match="appeared while this run was writing it"):
        with atomic_write_text(out, replace=False) as f:
            f.write("mine\n")
            out.write_text("theirs\n")  # the other run finished first
    assert out.read_text() == "theirs\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    with atomic_write_text(out, replace=True) as f:  # --force replaces
        f.write("mine\n")
    assert out.read_text() == "mine\n"


def test_an_unwritable_output_folder_is_one_line(work) -> None:
    target = Path("/proc/tiblocal-test.jsonl")  # a folder no one may create files in, root included
    line = one_line_error(run_cli("generate", "m.gguf", "--prompt", "hi", "--ctx", "512", "--out", str(target), cwd=work))
    assert "cannot write" in line and str(target) in line


def test_chat_save_into_a_missing_folder_keeps_the_chat(tiny_gguf, tmp_path) -> None:
    from tiblocal.chat import ChatSession
    from tiblocal.engine import Engine, EngineConfig, Sampling
    from tiblocal.errors import TiblocalError
    from tiblocal.templates import get_template

    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1)) as e:
        s = ChatSession(e, get_template("alpaca"), Sampling())
        with pytest.raises(TiblocalError, match="does not exist"):
            s.command(f"/save {tmp_path / 'missing' / 'chat.jsonl'}")
        before = snapshot(tiny_gguf)
        with pytest.raises(TiblocalError, match="already exists"):
            s.command(f"/save {tiny_gguf}")
        assert snapshot(tiny_gguf) == before
        assert "saved 0 messages" in s.command(f"/save {tmp_path / 'chat.jsonl'}")


# --- malformed files and values ----------------------------------------------------------------------------------


def test_truncated_xz_text_is_one_line(tmp_path) -> None:
    import lzma

    full = lzma.compress(("བོད་ཀྱི་ཡིག་ཆ། " * 2000).encode())
    cut = tmp_path / "cut.xz"
    cut.write_bytes(full[: len(full) // 2])
    line = one_line_error(run_cli("vocab", "stats", "bundled", "--text", str(cut)))
    assert "is not a valid .xz file" in line and str(cut) in line


@pytest.mark.parametrize("verb", [["inspect"], ["generate", "--prompt", "x"], ["quantize", "--type", "Q8_0", "--out",
                                                                                  "q.gguf"]])
def test_a_named_pipe_or_a_device_as_the_model_is_one_line(tmp_path, verb) -> None:
    """Opening a named pipe waits for a writer: `inspect PIPE` hung for ever. A device reads as no GGUF too."""
    pipe = tmp_path / "model.gguf"
    os.mkfifo(pipe)
    for path in (pipe, Path("/dev/zero")):
        line = one_line_error(run_cli(verb[0], str(path), *verb[1:], timeout=60, cwd=tmp_path))
        assert f"{path} is not a regular file (a pipe, a device or a socket); give the path of a .gguf model" in line
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("args, match", [
    (["--prompt", os.fsdecode(b"caf\xff")], "--prompt holds the byte 0xff, which is not UTF-8"),
    (["--prompt", "hi", "--system", os.fsdecode(b"\xfe")], "--system holds the byte 0xfe"),
    (["--file", "surrogate.jsonl"], "line 2 is not valid JSON (a lone UTF-16 surrogate (\\ud800)"),
])
def test_text_that_is_not_utf8_is_one_line(work, args, match) -> None:
    (work / "surrogate.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 here"}\n', encoding="utf-8")
    line = one_line_error(run_cli("generate", "m.gguf", *args, cwd=work))
    assert match in line, line


def test_a_byte_order_mark_at_the_start_of_a_text_file_is_not_text(tmp_path) -> None:
    """Windows' Notepad starts UTF-8 files with U+FEFF: it was the first prompt's first character, the first corpus
    line's, and made the first row of a JSON lines file fail to parse."""
    from tiblocal.finetune.data import read_instructions
    from tiblocal.generate import read_prompts
    from tiblocal.jsonlines import json_rows
    from tiblocal.vocab import read_lines

    bom = "\ufeff"
    (tmp_path / "p.txt").write_text(bom + "ཀ་ཁ\r\nབཀྲ་ཤིས\r\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(bom + '{"prompt": "ཀ"}\n{"instruction": "ཁ"}\n', encoding="utf-8")
    (tmp_path / "i.json").write_text(bom + '[{"instruction": "ཀ", "output": "ཁ"}]', encoding="utf-8")
    assert [p.instruction for p in read_prompts(tmp_path / "p.txt")] == ["ཀ་ཁ", "བཀྲ་ཤིས"]
    assert [p.instruction for p in read_prompts(tmp_path / "p.jsonl")] == ["ཀ", "ཁ"]
    assert list(read_lines([tmp_path / "p.txt"])) == ["ཀ་ཁ", "བཀྲ་ཤིས"]
    assert [row for _, row in json_rows(tmp_path / "p.jsonl", "--data", "rows")][0] == {"prompt": "ཀ"}
    rows, report = read_instructions(tmp_path / "i.json")
    assert len(rows) == 1 and report.rows == 1
    # a mark inside the text is the user's: kept
    (tmp_path / "mid.txt").write_text("ཀ" + bom + "ཁ\n", encoding="utf-8")
    assert next(read_lines([tmp_path / "mid.txt"])) == "ཀ" + bom + "ཁ"


def test_release_notes_that_are_not_utf8_are_one_line(work) -> None:
    (work / "notes.md").write_bytes(b"# notes \xff\n")
    line = one_line_error(run_cli("release", "hf", "--out", "rel", "--notes", "notes.md", cwd=work))
    assert "notes.md is not UTF-8 text" in line
    assert not (work / "rel").exists()


@pytest.mark.parametrize("args", [
    ["eval", "ppl", "m.gguf", "--text", "prompts.txt", "--max-windows", "-1"],
    ["release", "hf", "--out", "rel", "--max-windows", "0"],
    ["gptq", "hf", "--bits", "4", "--out", "g", "--samples", "0"],
    ["gptq", "hf", "--bits", "4", "--out", "g", "--seq-len", "0"],
    ["vocab", "extend", "--base", "bundled", "--corpus", "prompts.txt", "--add", "5", "--out", "v", "--sample-chars", "0"],
])
def test_counts_below_one_are_usage_errors(work, args) -> None:
    p = run_cli(*args, cwd=work)
    err = p.stderr.decode()
    assert p.returncode == 2 and "expected a whole number of at least 1" in err and "Traceback" not in err, err


def test_imatrix_device_is_checked(work) -> None:
    line = one_line_error(run_cli("imatrix", "hf", "--out", "i.gguf", "--device", "gpu0", cwd=work))
    assert "--device 'gpu0': expected cpu, cuda, cuda:N or mps" in line
    assert not (work / "i.gguf").exists()


@pytest.mark.parametrize("args", [
    ["imatrix", "hf", "--out", "i.gguf", "--text", "t.txt"],
    ["release", "hf", "--out", "rel", "--types", "Q8_0", "--make-imatrix"],
    ["gptq", "hf", "--bits", "4", "--out", "g"],
])
def test_a_gpu_that_torch_does_not_see_is_one_line_before_any_work(work, args) -> None:
    """`--device cuda` on a CPU build of torch failed in an assertion once the model had loaded (imatrix, release's
    importance matrix); gptq had its own check, now the same one."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA GPU here")
    (work / "t.txt").write_text("བཀྲ་ཤིས་བདེ་ལེགས། " * 400, encoding="utf-8")
    for device in ("cuda", "cuda:1"):
        line = one_line_error(run_cli(*args, "--device", device, cwd=work))
        assert f"--device {device}, but torch sees no CUDA GPU" in line, line
    assert not [f for f in work.iterdir() if f.name.startswith(("i.gguf", "rel", "g", ".i", ".rel", ".g"))]


def test_a_window_of_one_token_is_refused(work) -> None:
    line = one_line_error(run_cli("gptq", "hf", "--bits", "4", "--out", "g", "--seq-len", "1", "--device", "cpu",
                                  "--group-size", "64", cwd=work))  # divided by zero in the window count
    assert "--seq-len 1: expected windows of at least 2 tokens" in line


@pytest.mark.parametrize("verb, overrides, found", [
    ("pretrain", ["lr=abc", "max_steps=-3", "block_size=0"], ["lr is 'abc'", "max_steps is -3", "block_size is 0"]),
    ("pretrain", ["lr=.nan"], ["lr is nan, expected a number above 0"]),
    ("pretrain", ["batch_size=four"], ["batch_size is 'four', expected a whole number"]),
    ("sft", ["lora.dropout=1.5", "lora.r=0"], ["lora.dropout is 1.5", "lora.r is 0"]),
    ("sft", ["micro_tokens=many", "grad_accum=1"], ["micro_tokens is 'many'"]),
])
def test_recipe_values_are_checked_all_at_once(tmp_path, verb, overrides, found) -> None:
    pytest.importorskip("yaml")
    line = one_line_error(run_cli(verb, f"tiny-{verb}", f"output_dir={tmp_path / 'run'}", *overrides))
    for f in found:
        assert f in line, line
    assert f"{len(found)} setting(s) wrong" in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_missing_a_tensor_is_refused_by_convert_and_check(work) -> None:
    """One tensor taken out of the safetensors header: convert refuses (it wrote a GGUF llama.cpp could not load),
    and check reports it (it called the folder consistent)."""
    import struct as st

    shard = work / "hf" / "model.safetensors"
    raw = shard.read_bytes()
    (n,) = st.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    del header["model.layers.1.mlp.down_proj.weight"]
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # same length: the data offsets stay right
    shard.write_bytes(raw[:8] + new + raw[8 + n :])
    line = one_line_error(run_cli("convert", "hf", "--out", "m2.gguf", cwd=work))
    assert "missing: model.layers.1.mlp.down_proj.weight" in line and not (work / "m2.gguf").exists()
    p = run_cli("check", "hf", "--json", cwd=work)
    assert p.returncode == 1
    assert any("model.layers.1.mlp.down_proj.weight" in x for x in json.loads(p.stdout)["problems"])


@pytest.mark.parametrize("name, content, match", [
    ("config.json", "[1, 2]", "config.json is a JSON list"),
    ("config.json", None, "num_hidden_layers is missing"),
    ("config.json", {"hidden_size": "64"}, "hidden_size is '64', expected a whole number"),
    ("config.json", {"num_attention_heads": 0}, "num_attention_heads is 0"),
    # rope_scaling, written into the GGUF: a factor of "x", a beta of "x" and a list crashed; a negative factor and a
    # rope_type of 5 went through
    ("config.json", {"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor is 'x', expected a "
                                                                              "positive number"),
    ("config.json", {"rope_scaling": {"rope_type": "linear", "factor": -2}}, "rope_scaling.factor is -2"),
    ("config.json", {"rope_scaling": [1]}, "rope_scaling is [1], expected an object"),
    ("config.json", {"rope_scaling": {"rope_type": "linear", "factor": 10**400}}, "rope_scaling.factor is 1000"),
    ("config.json", {"rms_norm_eps": 10**400}, "rms_norm_eps is 1000"),  # both: OverflowError in math.isfinite
    ("config.json", {"rope_scaling": {"rope_type": 5, "factor": 2}}, "rope_scaling.rope_type is 5, expected a name"),
    ("config.json", {"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 512,
                                      "beta_fast": "x"}}, "rope_scaling.beta_fast is 'x', expected a number"),
    ("config.json", {"rope_parameters": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": "512"}},
     "rope_parameters.original_max_position_embeddings is '512', expected a whole number"),
    ("generation_config.json", {"do_sample": True, "temperature": float("nan")}, "temperature nan is not a valid"),
    ("generation_config.json", {"do_sample": True, "top_p": 1.5}, "top_p 1.5 is not a valid"),
    ("generation_config.json", {"do_sample": True, "top_k": 2**40}, "top_k 1099511627776 is not a valid setting "
                                                                     "(expected a whole number from 0 to 2147483647"),
])
def test_hf_folders_with_bad_json_are_one_line(work, name, content, match) -> None:
    cfg = json.loads((work / "hf" / "config.json").read_text())
    if content is None:
        del cfg["num_hidden_layers"]
        text = json.dumps(cfg)
    elif isinstance(content, dict):
        base = cfg if name == "config.json" else {}
        text = json.dumps(base | content)
    else:
        text = content
    (work / "hf" / name).write_text(text)
    before = snapshot(work)
    line = one_line_error(run_cli("convert", "hf", "--out", "m2.gguf", cwd=work))
    assert match in line, line
    assert snapshot(work) == before


@pytest.mark.parametrize("header, match", [
    ([1, 2], "a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "data_offsets None"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "data_offsets [8, 0]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "data_offsets [-8, 0]"),
    ({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}, "has shape [1000] of F32 but 8 bytes"),
])
def test_damaged_safetensors_headers_are_one_line(work, header, match) -> None:
    raw = json.dumps(header).encode()
    (work / "hf" / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    line = one_line_error(run_cli("check", "hf", cwd=work))
    assert match in line, line


# --- the error paths of the guards themselves --------------------------------------------------------------------


@pytest.mark.parametrize("raised, match", [
    ("MemoryError()", "tiblocal inspect ran out of memory"),
    ("ModuleNotFoundError('No module named foo', name='foo')", "unexpected ModuleNotFoundError in tiblocal inspect"),
])
def test_memory_and_unknown_missing_modules(tmp_path, raised, match) -> None:
    code = (
        "import sys, tiblocal.cli as c, tiblocal.commands as m\n"
        f"def boom(o: m.InspectOptions): raise {raised}\n"
        "m.inspect = boom\n"
        "sys.exit(c.main(['inspect', 'x.gguf']))\n"
    )
    assert match in one_line_error(run_python(code, env={"XDG_CACHE_HOME": str(tmp_path)}))


def test_no_place_for_the_crash_report_is_said(monkeypatch, tmp_path) -> None:
    import tempfile

    from tiblocal import cli

    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-place")
    monkeypatch.setattr(tempfile, "tempdir", "/proc/no-such-place")
    try:
        raise ValueError("x")
    except ValueError:
        assert cli.crash_report(["inspect"]) is None


def test_a_file_where_a_folder_goes_is_refused(tmp_path) -> None:
    from tiblocal.errors import TiblocalError
    from tiblocal.fsutil import check_output_path

    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(TiblocalError, match="is a file, and a folder goes there"):
        check_output_path(f, force=True, folder=True)
    with pytest.raises(TiblocalError, match="does not exist; create it first"):
        check_output_path(tmp_path / "no" / "out")


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path) -> None:
    import random

    rng = random.Random(0)
    letters = "ཀཁགངཅཆཇཉཏཐདནཔཕབམཙཚཛཝཞཟའཡརལཤསཧ"
    signs = ["", "ི", "ུ", "ེ", "ོ"]
    syllable = lambda: rng.choice(letters) + rng.choice(signs) + rng.choice(["", "ག", "ང", "ད", "ན", "བ", "མ", "ས"])
    lines = ["་".join(syllable() for _ in range(12)) + "།" for _ in range(3000)]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    line = one_line_error(run_cli("vocab", "extend", "--base", "bundled", "--corpus", "c.txt", "--add", "20",
                                  "--out", "/proc/tiblocal-vocab", cwd=tmp_path))
    assert "cannot write in /proc" in line


def test_a_short_write_on_a_full_disk_says_the_disk_is_full(monkeypatch, tmp_path) -> None:
    """numpy's tofile reports a full disk as "N requested and M written", without an errno."""
    import shutil as sh

    from tiblocal.errors import TiblocalError
    from tiblocal.fsutil import atomic_path

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(100, 100, 0))
    with pytest.raises(TiblocalError, match="the disk is full while writing .*no space left on the device"):
        with atomic_path(tmp_path / "x.gguf") as tmp:
            tmp.write_bytes(b"x")
            raise OSError("131072 requested and 28168 written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("errno_name", ["EPERM", "EXDEV"])
def test_a_file_system_without_hard_links_still_takes_the_name_once(monkeypatch, tmp_path, errno_name) -> None:
    import errno as e

    from tiblocal.errors import TiblocalError
    from tiblocal.fsutil import atomic_write_text

    def no_link(src, dst):
        raise OSError(getattr(e, errno_name), "no hard links here")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "a.txt"
    with atomic_write_text(out, replace=False) as f:
        f.write("one")
    assert out.read_text() == "one"
    with pytest.raises(TiblocalError, match="appeared while this run was writing it"):
        with atomic_write_text(out, replace=False) as f:
            f.write("two")
    assert out.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_json_output_has_no_nan(capsys) -> None:
    """Python's json writes a bare NaN, which is not JSON: --json results write null for it (sft's loss can be NaN)."""
    from tiblocal.jsonout import print_json

    print_json({"train_loss": float("nan"), "rows": [{"ppl": float("inf")}, 1.5], "n": 3})
    assert json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c)) == {
        "train_loss": None, "rows": [{"ppl": None}, 1.5], "n": 3}


def test_a_dangling_symlink_as_the_output_is_an_existing_name(work) -> None:
    (work / "dangling.jsonl").symlink_to(work / "nowhere")
    line = one_line_error(run_cli("generate", "m.gguf", "--prompt", "hi", "--ctx", "512", "--out", "dangling.jsonl",
                                  cwd=work))
    assert "already exists; pass --force" in line
    p = run_cli("generate", "m.gguf", "--prompt", "hi", "--ctx", "512", "--max-tokens", "2", "--out", "dangling.jsonl",
                "--force", cwd=work)
    assert p.returncode == 0, p.stderr
    assert (work / "dangling.jsonl").is_file() and not (work / "dangling.jsonl").is_symlink()
    assert not (work / "nowhere").exists()


def test_eval_report_never_replaces_its_text_and_asks_for_force(work) -> None:
    """`eval report --out OUT` writes OUT.json and OUT.md: a text file named OUT.md is an input, and an existing report
    is kept without --force; both refused before the minutes of measuring."""
    (work / "notes.md").write_text("བོད་ཀྱི་ཡིག་ཆ། " * 50, encoding="utf-8")
    before = snapshot(work)
    line = one_line_error(run_cli("eval", "report", "m.gguf", "m.gguf", "--text", "notes.md", "--out", "notes",
                                  "--force", cwd=work))
    assert "is the input notes.md" in line
    (work / "r.json").write_text("{}")
    line = one_line_error(run_cli("eval", "report", "m.gguf", "m.gguf", "--text", "notes.md", "--out", "r", cwd=work))
    assert "r.json already exists; pass --force" in line
    assert snapshot(work) == before | snapshot(work / "r.json")


def test_a_training_output_dir_holding_its_text_is_refused(tmp_path) -> None:
    pytest.importorskip("torch")
    data = tmp_path / "data"
    data.mkdir()
    text = data / "t.txt"
    text.write_text(Path("tests/data/tibetan_sample.txt").read_text(encoding="utf-8"), encoding="utf-8")
    before = snapshot(data)
    line = one_line_error(run_cli("pretrain", "tiny-pretrain", f"output_dir={data}", f"train_files=[{text}]",
                                  f"eval_files=[{text}]", timeout=300))
    assert "output_dir" in line and "contains the input" in line
    assert snapshot(data) == before


# --- JSON that parses but that Python or the tokenizer cannot take --------------------------------------------------

DEEP = "[" * 3000 + "]" * 3000  # past the parser's recursion
LONG_NUMBER = "1" + "0" * 5000  # past Python's 4,300 digits
LONE_SURROGATE = '"a\\ud800b"'  # JSON's escape of no character


def test_one_parse_refuses_what_python_and_the_tokenizer_cannot_take() -> None:
    from tiblocal.jsonin import loads

    for text, match in [(DEEP, "nested too deeply"), (f'{{"n": {LONG_NUMBER}}}', "a number too long"),
                        (f'{{"x": [{LONE_SURROGATE}]}}', "lone UTF-16 surrogate (\\ud800)"),
                        ('{"x": "\\udc00"}'.encode(), "lone UTF-16 surrogate (\\udc00)")]:
        with pytest.raises(json.JSONDecodeError, match=re.escape(match)):
            loads(text)
    assert loads('{"x": "\\ud83d\\ude00", "y": "\\\\ud800"}') == {"x": "😀", "y": "\\ud800"}  # a pair; an escaped "\"


@pytest.mark.parametrize("value", [DEEP, LONG_NUMBER, LONE_SURROGATE], ids=["deep", "long-number", "lone-surrogate"])
def test_json_that_python_cannot_hold_is_one_line_in_every_reader(work, value) -> None:
    """The same three values in a prompts file, an evaluation file, config.json, generation_config.json,
    tokenizer.json, tiblocal_vocab.json and a safetensors header: one line naming the file, nothing written."""
    hf = work / "hf"
    (work / "p.jsonl").write_text(f'{{"prompt": {value}}}\n', encoding="utf-8")
    (work / "q.jsonl").write_text(f'{{"question": {value}}}\n', encoding="utf-8")
    cases = [(["generate", "m.gguf", "--file", "p.jsonl", "--out", "o.jsonl"], "p.jsonl line 1"),
             (["eval", "mcq", "m.gguf", "--data", "q.jsonl"], "q.jsonl line 1")]
    for args, where in cases:
        before = snapshot(work)
        line = one_line_error(run_cli(*args, cwd=work))
        assert where in line and "not valid JSON" in line, line
        assert snapshot(work) == before
    cfg = (hf / "config.json").read_text()
    for name, text, args in [
        ("config.json", cfg[:-1].rstrip().rstrip("}") + f', "x": {value}}}', ["convert", "hf", "--out", "m2.gguf"]),
        ("generation_config.json", f'{{"do_sample": true, "x": {value}}}', ["convert", "hf", "--out", "m2.gguf"]),
        ("tokenizer.json", f'{{"model": {value}}}', ["check", "hf"]),
        ("tiblocal_vocab.json", f'{{"base_pieces": 5, "x": {value}}}', ["release", "hf", "--out", "rel"]),
    ]:
        keep = (hf / name).read_text() if (hf / name).exists() else None
        (hf / name).write_text(text, encoding="utf-8")
        before = snapshot(work)
        line = one_line_error(run_cli(*args, cwd=work))
        assert name in line and ("not valid JSON" in line or "damaged" in line), line
        assert snapshot(work) == before and not (work / "m2.gguf").exists() and not (work / "rel").exists()
        if keep is None:
            (hf / name).unlink()
        else:
            (hf / name).write_text(keep)
    raw = f'{{"w": {value}}}'.encode()
    (hf / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    line = one_line_error(run_cli("check", "hf", cwd=work))
    assert "damaged safetensors header" in line, line


@pytest.mark.parametrize("recipe, overrides, match", [
    ("stage: pretrain\nx: " + DEEP, [], "nests lists or mappings too deeply"),
    ("stage: pretrain\nlr: " + LONG_NUMBER, [], "holds a number too long to be read"),
    (b"stage: pretrain\nlr: \xff\n", [], "is not UTF-8 text (byte offset 20)"),
    ("stage: [\n", [], "is not valid YAML"),
    (None, ["lr=" + LONG_NUMBER], "override 'lr=1" + "0" * 56 + "…' holds a number too long"),
    (None, ["lr=["], "override 'lr=[' is not valid YAML"),
    (None, ["model_config=" + DEEP], "[[[…' nests lists or mappings too deeply"),
], ids=["deep", "long-number", "not-utf8", "bad-yaml", "override-long-number", "override-bad-yaml", "override-deep"])
def test_recipes_and_overrides_that_cannot_be_read_are_one_line(tmp_path, recipe, overrides, match) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "r.yaml"
    if recipe is not None:
        path.write_bytes(recipe if isinstance(recipe, bytes) else recipe.encode())
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("pretrain", str(path) if recipe is not None else "tiny-pretrain",
                                  f"output_dir={tmp_path / 'run'}", *overrides))
    assert match in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("saved, match", [
    ("x: " + DEEP, "nests lists or mappings too deeply"), ("[1, 2]", "holds no recipe (a YAML list)"),
    ("stage: [\n", "is not valid YAML"),
], ids=["deep", "a-list", "bad-yaml"])
def test_a_damaged_saved_recipe_in_the_output_dir_is_one_line(tmp_path, saved, match) -> None:
    pytest.importorskip("yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text(saved, encoding="utf-8")
    before = snapshot(tmp_path)
    line = one_line_error(run_cli("pretrain", "tiny-pretrain", f"output_dir={run}"))
    assert match in line and "run_config.yaml" in line and "delete" in line, line
    assert snapshot(tmp_path) == before

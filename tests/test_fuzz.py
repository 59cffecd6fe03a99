"""Property-based fuzzing of every reader of user input (Hypothesis, derandomized: the same examples on every run).

Each reader gets mutated or generated input and must either accept it or refuse it with a TiblocalError (which the
CLI prints as one line and exit 1): no other exception, no hang, and no input file changed. The CLI itself is run on a
few of the mutated files as a subprocess, checking the one line and the exit code.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import run_cli  # noqa: E402
from tiblocal.errors import TiblocalError  # noqa: E402

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values of every kind, nested: what a damaged or hand-edited file may hold
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def accepts_or_refuses(fn, *args):
    """Run a reader: it returns, or raises TiblocalError; anything else fails the test."""
    try:
        return fn(*args)
    except TiblocalError:
        return None


def _digest(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


# --- GGUF headers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_header(tiny_gguf):
    """The tiny model's bytes and where its header ends (the tensor data starts)."""
    from tiblocal.gguf_file import read_gguf

    data = tiny_gguf.read_bytes()
    info = read_gguf(tiny_gguf)
    data_bytes = sum(t.n_bytes for t in info.tensors)
    return data, len(data) - data_bytes


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 1 << 20)))
def test_mutated_gguf_headers_are_read_or_refused(gguf_header, tmp_path_factory, edits, cut) -> None:
    from tiblocal.check import check_gguf
    from tiblocal.gguf_file import read_gguf
    from tiblocal.inspect_model import describe

    data, header_end = gguf_header
    buf = bytearray(data)
    for offset, value in edits:
        buf[offset % header_end] = value
    if cut is not None:
        buf = buf[: cut % len(buf)]
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    path.write_bytes(bytes(buf))
    before = _digest(path)
    accepts_or_refuses(read_gguf, path)
    accepts_or_refuses(describe, path)
    accepts_or_refuses(check_gguf, path)
    assert _digest(path) == before


def _gguf_bytes(entries: list[tuple[bytes, int, bytes]]) -> bytes:
    """A GGUF v3 file of no tensors and these (key, value type, packed value) entries."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    for key, vtype, value in entries:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + value
    return out


@pytest.mark.parametrize("vtype, value", [
    (4, struct.pack("<I", 0)),  # uint32 0: the data offset would be taken modulo 0
    (4, struct.pack("<I", 24)),
    (8, struct.pack("<Q", 1) + b"x"),  # a string
])
def test_gguf_alignment_that_is_not_a_power_of_two_is_refused(tmp_path, vtype, value) -> None:
    from tiblocal.gguf_file import read_gguf

    path = tmp_path / "bad.gguf"
    path.write_bytes(_gguf_bytes([(b"general.alignment", vtype, value)]))
    with pytest.raises(TiblocalError, match="power of two"):
        read_gguf(path)
    good = tmp_path / "good.gguf"
    good.write_bytes(_gguf_bytes([(b"general.alignment", 4, struct.pack("<I", 64))]))
    assert read_gguf(good).tensors == []


def test_gguf_arrays_nested_deeply_are_refused(tmp_path) -> None:
    """An array of arrays 100 deep (a file made to exhaust the reader's recursion) is one error."""
    from tiblocal.gguf_file import read_gguf

    nested = (struct.pack("<I", 9) + struct.pack("<Q", 1)) * 100 + struct.pack("<I", 4) + struct.pack("<Q", 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(_gguf_bytes([(b"x.nested", 9, nested)]))
    with pytest.raises(TiblocalError, match="nested"):
        read_gguf(path)


def test_gguf_dimensions_whose_product_overflows_are_refused_not_zero(tiny_gguf, tmp_path) -> None:
    """Dimensions of 2**40 each: their product is not taken modulo 2**64 (it was reported as 0 parameters)."""
    from tiblocal.gguf_file import read_gguf

    data = bytearray(tiny_gguf.read_bytes())
    info = read_gguf(tiny_gguf)
    first = info.tensors[0]
    name = first.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    for d in range(n_dims):
        struct.pack_into("<Q", data, at + 4 + 8 * d, 1 << 40)
    path = tmp_path / "overflow.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(TiblocalError, match="truncated"):
        read_gguf(path)


# --- Hugging Face folders: config.json and safetensors headers ----------------------------------------------------


@pytest.fixture(scope="module")
def hf_copy(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcopy") / "hf"
    shutil.copytree(tiny_hf, root)
    return root


@FUZZ
@given(changes=st.dictionaries(
    st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                     "tie_word_embeddings", "architectures", "rope_scaling", "bos_token_id"]),
    JSON, min_size=1, max_size=3),
    drop=st.lists(st.sampled_from(["vocab_size", "num_hidden_layers", "hidden_size"]), max_size=1))
def test_config_json_of_wrong_types_and_ranges_is_refused(hf_copy, changes, drop) -> None:
    from tiblocal.check import check_hf
    from tiblocal.convert.hf_to_gguf import ModelConverter
    from tiblocal.checkpoint import HFCheckpoint

    cfg_path = hf_copy / "config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original) | changes
    for k in drop:
        cfg.pop(k, None)
    try:
        cfg_path.write_text(json.dumps(cfg))
        accepts_or_refuses(check_hf, hf_copy)
        ckpt = accepts_or_refuses(HFCheckpoint.open, hf_copy)
        if ckpt is not None:
            conv = accepts_or_refuses(ModelConverter.for_checkpoint, ckpt)
            if conv is not None:
                accepts_or_refuses(conv.problems)
    finally:
        cfg_path.write_text(original)


@FUZZ
@given(doc=JSON)
def test_config_json_of_any_shape_is_refused(hf_copy, doc) -> None:
    from tiblocal.checkpoint import load_config

    cfg_path = hf_copy / "config.json"
    original = cfg_path.read_text()
    try:
        cfg_path.write_text(json.dumps(doc))
        accepts_or_refuses(load_config, hf_copy)
    finally:
        cfg_path.write_text(original)


@FUZZ
@given(header=st.one_of(JSON, st.dictionaries(st.text(max_size=6), st.fixed_dictionaries(
    {}, optional={"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "Q4", 3]),
                  "shape": st.one_of(JSON, st.lists(st.integers(-3, 1 << 62), max_size=3)),
                  "data_offsets": st.one_of(JSON, st.lists(st.integers(-(1 << 63), 1 << 63), min_size=2, max_size=2))}),
    max_size=3)), data_len=st.integers(0, 64))
def test_safetensors_headers_are_read_or_refused(tmp_path_factory, header, data_len) -> None:
    from tiblocal.checkpoint import read_safetensors_header

    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    refs = accepts_or_refuses(read_safetensors_header, path)
    for ref in (refs or {}).values():  # what is accepted lies inside the file and matches its shape
        assert 0 <= ref.start <= ref.end <= path.stat().st_size
        assert math.prod(ref.shape) * {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}[ref.dtype] == ref.end - ref.start


# --- SHA256SUMS, prompt files, sampling values, recipes ----------------------------------------------------------


@FUZZ
@given(lines=st.lists(st.one_of(
    st.text(max_size=80),
    st.builds(lambda d, n: f"{d}  {n}", st.text("0123456789abcdef", min_size=64, max_size=64),
              st.sampled_from(["a.gguf", "../a.gguf", "/etc/passwd", "sub/../../x", "*a.gguf", "sub/b", "", "..", "."]))),
    max_size=5), raw=st.binary(max_size=40))
def test_sha256sums_are_read_or_refused_and_never_leave_the_folder(tmp_path_factory, lines, raw) -> None:
    from tiblocal.verify import verify

    folder = tmp_path_factory.mktemp("rel")
    (folder / "a.gguf").write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "b").write_bytes(b"y")
    (folder / "SHA256SUMS").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
    status = accepts_or_refuses(verify, folder)
    for name in status or {}:
        assert (folder / name).resolve().is_relative_to(folder.resolve()), name


@FUZZ
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".txt", ".jsonl", ".json"]))
def test_prompt_files_are_read_or_refused(tmp_path_factory, raw, suffix) -> None:
    from tiblocal.generate import read_prompts

    path = tmp_path_factory.mktemp("prompts") / f"p{suffix}"
    path.write_bytes(raw)
    accepts_or_refuses(read_prompts, path)


@FUZZ
@given(doc=st.lists(st.dictionaries(st.sampled_from(["instruction", "input", "prompt", "x"]), JSON, max_size=3),
                    max_size=4))
def test_jsonl_prompts_of_any_shape_are_read_or_refused(tmp_path_factory, doc) -> None:
    from tiblocal.generate import read_prompts

    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in doc), encoding="utf-8")
    accepts_or_refuses(read_prompts, path)


NUMBER = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([1e308, -1e39, 3.4e38, 1e-320, 1e-45, 1e-40,  # around a C float's range
                                    10**400]))  # an integer past any float (JSON allows it)


@FUZZ
@given(values=st.fixed_dictionaries({}, optional={
    "temperature": NUMBER, "top_k": st.integers(-5, 2**33), "top_p": NUMBER, "repeat_penalty": NUMBER,
    "repeat_last_n": st.integers(-5, 2**33), "max_tokens": st.integers(-5, 2**31), "frequency_penalty": NUMBER,
    "presence_penalty": NUMBER, "seed": st.integers(-(2**40), 2**40)}))
def test_sampling_values_are_accepted_only_when_finite_and_in_range(values) -> None:
    from tiblocal.engine import SEED_MAX, Sampling, as_float32

    s = accepts_or_refuses(lambda: Sampling(**values))
    if s is not None:  # finite as the C floats llama.cpp receives, not only as Python floats
        floats = (s.temperature, s.top_p, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
        assert all(math.isfinite(as_float32(v)) for v in floats) and s.temperature >= 0
        assert 0 < as_float32(s.top_p) <= 1 and as_float32(s.repeat_penalty) > 0
        assert -1 <= s.seed <= SEED_MAX and 0 <= s.top_k < 2**31 and 0 <= s.repeat_last_n < 2**31


@FUZZ
@given(changes=st.dictionaries(
    st.sampled_from(["block_size", "batch_size", "grad_accum", "max_steps", "lr", "embed_lr", "weight_decay",
                     "warmup_steps", "eval_every", "save_every", "log_every", "seed", "micro_tokens", "scheduler",
                     "dtype", "train_files", "lora", "extended", "generation", "train_weights"]),
    JSON, min_size=1, max_size=3))
def test_recipes_of_wrong_types_and_ranges_are_refused(changes) -> None:
    pytest.importorskip("yaml")
    from tiblocal.finetune.config import build_config

    base = {"stage": "pretrain", "output_dir": "runs/x", "train_files": ["a.txt"]}
    cfg = accepts_or_refuses(build_config, base | changes)
    if cfg is not None:
        assert cfg.block_size >= 2 and cfg.batch_size >= 1 and cfg.max_steps >= 1
        assert isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0


# --- the CLI on a few of them --------------------------------------------------------------------------------------


@settings(max_examples=6, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6))
def test_the_cli_on_mutated_gguf_files_is_one_line_or_success(gguf_header, tmp_path_factory, edits) -> None:
    data, header_end = gguf_header
    buf = bytearray(data)
    for offset, value in edits:
        buf[offset % header_end] = value
    path = tmp_path_factory.mktemp("cli") / "m.gguf"
    path.write_bytes(bytes(buf))
    for verb in ("inspect", "check"):
        p = run_cli(verb, str(path), "--json")
        err = p.stderr.decode()
        assert "Traceback" not in err and "unexpected" not in err, err
        if p.returncode:
            assert p.returncode == 1 and len([l for l in err.splitlines() if l.strip()]) == 1, err
            assert json.loads(p.stdout)  # the error object, or check's report


# --- the server's API ----------------------------------------------------------------------------------------------

# A request body as a client might get it wrong: the API's own fields, each either a plausible value or any JSON value,
# plus fields it does not know
_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"]),
                           "content": st.one_of(st.text(max_size=20), JSON)}),
    JSON,
)
_SAMPLED = {
    "model": st.one_of(st.just("tiny-f32"), JSON),
    "max_tokens": st.one_of(st.integers(-3, 6), JSON),
    "temperature": st.one_of(NUMBER, JSON), "top_p": st.one_of(NUMBER, JSON), "top_k": st.one_of(NUMBER, JSON),
    "repeat_penalty": st.one_of(NUMBER, JSON), "frequency_penalty": st.one_of(NUMBER, JSON),
    "presence_penalty": st.one_of(NUMBER, JSON), "seed": st.one_of(NUMBER, JSON),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5), JSON),
    "n": st.one_of(st.integers(-1, 3), JSON), "stream": st.one_of(st.booleans(), JSON),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), JSON),
    "logprobs": JSON, "unknown": JSON,
}
_FIELDS = {  # each route's fields, each either a plausible value or any JSON value
    "/v1/chat/completions": _SAMPLED | {
        "messages": st.one_of(st.lists(_MESSAGE, max_size=3), JSON),
        "max_completion_tokens": st.one_of(st.integers(-3, 6), JSON),
        "response_format": st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
            st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.one_of(
                st.fixed_dictionaries({"name": st.text(max_size=5), "schema": JSON}), JSON)}),
            JSON),
    },
    "/v1/completions": _SAMPLED | {
        "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3), JSON),
        "echo": JSON,
    },
    "/tokenize": {"content": st.one_of(st.text(max_size=20), JSON), "add_special": JSON, "parse_special": JSON,
                  "with_pieces": JSON, "unknown": JSON},
    "/detokenize": {"tokens": st.one_of(st.lists(st.integers(-(2**40), 2**40), max_size=4), JSON), "unknown": JSON},
}
_BASES = {  # a valid request for each route; most examples change one or two of its fields
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
    "/v1/completions": {"prompt": "hello", "max_tokens": 4},
    "/tokenize": {"content": "hello"},
    "/detokenize": {"tokens": [1, 2, 3]},
}


def _bodies(path: str):
    fields = _FIELDS[path]
    changed = st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))
    return st.tuples(st.just(path), st.one_of(
        changed.map(lambda c: _BASES[path] | c),
        st.fixed_dictionaries({}, optional=fields),
        JSON,
        st.binary(max_size=40),  # not JSON at all, or not UTF-8
    ))


REQUESTS = st.sampled_from(sorted(_BASES)).flatmap(_bodies)


@pytest.fixture(scope="module")
def fuzz_server(tiny_gguf):
    from tiblocal.serve.process import Server

    s = Server(str(tiny_gguf), "--parallel", "2", "--ctx", "128", "--max-body", "65536")
    yield s
    rc, log = s.stop(), s.stderr
    assert rc == 0 and "Traceback" not in log and " 500 " not in log, log


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=REQUESTS)
def test_the_server_answers_any_body_with_an_answer_or_an_error_object(fuzz_server, request) -> None:
    """Whatever a client posts, the server answers 200 or a 4xx with OpenAI's error object, never a 500, and keeps
    serving; its log has no traceback (checked when the module's server stops)."""
    httpx = pytest.importorskip("httpx")
    path, body = request
    raw = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    with httpx.Client(timeout=60) as c:
        r = c.post(fuzz_server.url + path, content=raw, headers={"Content-Type": "application/json"})
        if r.status_code == 200:
            if r.headers["content-type"].startswith("text/event-stream"):
                events = [line for line in r.text.splitlines() if line.startswith("data: ")]
                assert events and events[-1] == "data: [DONE]", r.text
                for line in events[:-1]:
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
            else:
                assert isinstance(r.json(), dict)
        else:
            assert 400 <= r.status_code < 500, (r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert c.get(fuzz_server.url + "/health").json()["status"] == "ok"


# JSON values one at a time in each field, raw: what Hypothesis' JSON values do not reach (NaN, numbers past Python's
# 4,300 digits, lone surrogates, nesting past the parser's recursion, long strings)
RAW_VALUES = [b"null", b"true", b"-1", b"0", b"4", b"9223372036854775808", b"1e308", b"-1e308", b"NaN", b"-Infinity",
              b'""', b'"x"', b'"' + b"x" * 3000 + b'"', b"[]", b"[null]", b'["a", 1]', b"{}", b'{"a": [1]}',
              b'"\\ud800"', b"1" + b"0" * 5000, b"[" * 3000 + b"]" * 3000,
              b'[{"role": "user", "content": "\\udfff"}]', b'{"type": "json_schema", "json_schema": {"schema": 1}}']


@pytest.mark.parametrize("path", sorted(_BASES))
def test_each_field_of_each_route_takes_any_json_value_or_refuses_it(fuzz_server, path) -> None:
    """Every field of the route, in a valid request, set to each raw value above: 200 or a 4xx error object."""
    httpx = pytest.importorskip("httpx")
    with httpx.Client(timeout=60) as c:
        for name in sorted(_FIELDS[path]):
            head = json.dumps(_BASES[path] | {name: "@@"}).encode()
            for value in RAW_VALUES:
                r = c.post(fuzz_server.url + path, content=head.replace(b'"@@"', value),
                           headers={"Content-Type": "application/json"})
                assert r.status_code == 200 or (400 <= r.status_code < 500 and set(r.json()["error"]) == {
                    "message", "type", "param", "code"}), (name, value[:40], r.status_code, r.text[:200])
        assert c.get(fuzz_server.url + "/health").json()["status"] == "ok"

"""The llama.cpp engine on a tiny random model: token ids, sampling, streaming, cache reuse, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from tiblocal.engine import Engine, EngineConfig, Generation, Sampling, gpu_offload_supported
from tiblocal.errors import EngineError, PromptTooLongError, TiblocalError
from tiblocal.text import Utf8Stream

LINES = [
    "བཀྲ་ཤིས་བདེ་ལེགས། ང་ཚོ་ལྷ་སར་འགྲོ་གི་ཡོད།",
    "Hello world, 12345 and  two  spaces",
    "mixed བོད་ཡིག and 中文\n\nnew lines",
    "ཨོཾ་མ་ཎི་པདྨེ་ཧཱུྃ",
]


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1)) as e:
        yield e


def test_token_ids_equal_sentencepiece(engine, tiny_tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    for line in LINES:
        assert engine.tokenize(line, add_bos=False, special=False) == sp.encode(line)
        assert engine.tokenize(line)[0] == sp.bos_id()


def test_special_tokens_parse_in_rendered_prompts(engine) -> None:
    ids = engine.tokenize("a</s><s>b", add_bos=False)
    assert engine.eos_id in ids and engine.bos_id in ids
    assert engine.bos_text == "<s>" and engine.eos_text == "</s>"


def test_byte_fallback_pieces_reassemble_to_tibetan(engine, tiny_tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    text = "ཧཱུྃ་ཀྵ"  # rare characters: the tiny vocabulary spells them with byte tokens
    ids = engine.tokenize(text, add_bos=False, special=False)
    pieces = [engine.piece(t) for t in ids]
    assert any(sp.IsByte(t) for t in ids)
    assert any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # a single byte of a 3-byte character
    stream = Utf8Stream()
    shown = [stream.feed(p) for p in pieces]
    assert all("\ufffd" not in s for s in shown)
    assert ("".join(shown) + stream.finish()).strip() == text
    assert engine.detokenize(ids) == text


def _run(engine, prompt, sampling):
    result = Generation()
    text = "".join(engine.stream(engine.tokenize(prompt), sampling, result=result))
    return text, result


def test_same_seed_same_text_and_greedy_is_deterministic(engine) -> None:
    s = Sampling(temperature=0.8, seed=42, max_tokens=24)
    a, ra = _run(engine, "བཀྲ་ཤིས་", s)
    engine.reset()
    b, rb = _run(engine, "བཀྲ་ཤིས་", s)
    assert (a, ra.tokens) == (b, rb.tokens)
    assert ra.completion_tokens == 24 and ra.stop_reason == "length"
    g1, _ = _run(engine, "Hello", Sampling(temperature=0, max_tokens=16))
    g2, _ = _run(engine, "Hello", Sampling(temperature=0, max_tokens=16, seed=7))
    assert g1 == g2


def test_cache_reuse_gives_the_same_tokens_as_a_fresh_start(engine) -> None:
    s = Sampling(temperature=0, max_tokens=12)
    prefix = "Below is an instruction. ### Instruction:\nབཀྲ་ཤིས་"
    _run(engine, prefix + "བདེ་ལེགས།", s)
    warm_text, warm = _run(engine, prefix + "ལྷ་ས།", s)
    assert warm.reused_tokens > 5
    engine.reset()
    cold_text, cold = _run(engine, prefix + "ལྷ་ས།", s)
    assert cold.reused_tokens == 0
    assert warm.tokens == cold.tokens and warm_text == cold_text


def test_stop_string_cuts_the_answer(engine) -> None:
    s = Sampling(temperature=0, max_tokens=20)
    full, _ = _run(engine, "Hello", s)
    assert len(full) > 4
    stop = full[2:5]
    result = Generation()
    text = "".join(engine.stream(engine.tokenize("Hello"), s, stops=[stop], result=result))
    assert text == full[: full.index(stop)]
    assert result.stop_reason == "stop" and result.text == text


def test_closing_the_stream_keeps_the_partial_answer(engine) -> None:
    result = Generation()
    gen = engine.stream(engine.tokenize("Hello"), Sampling(temperature=0, max_tokens=50), result=result)
    first = next(gen)
    gen.close()
    assert result.stop_reason == "interrupted"
    assert result.text.startswith(first)
    # the engine is still usable afterwards
    text, r = _run(engine, "Hello", Sampling(temperature=0, max_tokens=5))
    assert r.completion_tokens == 5


def test_prompt_longer_than_the_context(engine) -> None:
    long = engine.tokenize("བཀྲ་ཤིས་" * 200)
    assert len(long) > engine.n_ctx
    with pytest.raises(PromptTooLongError, match=r"the prompt has \d+ tokens but the context holds 256"):
        list(engine.stream(long, Sampling()))


def test_generation_stops_when_the_context_is_full(tiny_gguf) -> None:
    with Engine(tiny_gguf, EngineConfig(ctx=32, threads=1)) as e:
        text, r = _run(e, "Hello", Sampling(temperature=1.0, seed=3, max_tokens=1000, repeat_penalty=1.0))
        # llama.cpp may round the context up (to 256 here); the engine reports the real size
        assert e.n_ctx >= 32
        assert r.stop_reason in ("context", "eos")
        assert r.prompt_tokens + r.completion_tokens <= e.n_ctx


def test_gpu_layers_without_gpu_build_is_a_clear_error(tiny_gguf) -> None:
    if gpu_offload_supported():
        pytest.skip("this llama-cpp-python build has a GPU backend")
    with pytest.raises(EngineError, match="no GPU backend; reinstall it with CMAKE_ARGS"):
        Engine(tiny_gguf, EngineConfig(n_gpu_layers=-1))


def test_gpu_layers_past_int32_mean_every_layer(tiny_gguf, monkeypatch) -> None:
    """llama.cpp's n_gpu_layers is an int32_t: what reaches it for a count ctypes would wrap (2**32 + 5 was 5)."""
    import tiblocal.engine as te

    lib = te._bindings()
    given = []
    load = lib.llama_model_load_from_file

    def spy(path, params):
        given.append(params.n_gpu_layers)
        return load(path, params)

    monkeypatch.setattr(lib, "llama_model_load_from_file", spy)
    monkeypatch.setattr(te, "check_gpu_offload", lambda *a: None)  # this CPU build ignores the layers it is given
    for asked in (2**32 + 5, 2**31, -1, 0, 3):
        Engine(tiny_gguf, EngineConfig(ctx=32, threads=1, n_gpu_layers=asked)).close()
    assert given == [2**31 - 1, 2**31 - 1, 2**31 - 1, 0, 3]


def test_sampling_settings_are_checked() -> None:
    with pytest.raises(TiblocalError, match="top_p 1.5"):
        Sampling(top_p=1.5)
    s = Sampling().with_value("temp", "0.7").with_value("top_k", "5").with_value("max-tokens", "9")
    assert (s.temperature, s.top_k, s.max_tokens) == (0.7, 5, 9)
    with pytest.raises(TiblocalError, match="unknown setting 'warmth'"):
        Sampling().with_value("warmth", "1")
    with pytest.raises(TiblocalError, match="top_k must be an integer"):
        Sampling().with_value("top_k", "x")
    with pytest.raises(TiblocalError, match="temperature -1.0"):
        Sampling().with_value("temp", "-1")
    # llama.cpp's seed is a uint32_t: a larger one would wrap without a word
    with pytest.raises(TiblocalError, match=r"seed 4294967296 \(expected 0 to 4294967295, or -1"):
        Sampling().with_value("seed", str(2**32))
    with pytest.raises(TiblocalError, match="seed -2"):
        Sampling(seed=-2)
    assert Sampling(seed=2**32 - 1).seed == 2**32 - 1
    # top-k and the penalties' window are int32_t in llama.cpp: 2**32 + 1 would have wrapped to 1 (greedy)
    with pytest.raises(TiblocalError, match=r"top_k 4294967297 \(expected 0 to 2147483647"):
        Sampling(top_k=2**32 + 1)
    with pytest.raises(TiblocalError, match=r"repeat_last_n 2147483648 \(expected 0 to 2147483647\)"):
        Sampling().with_value("repeat_last_n", str(2**31))
    assert Sampling(top_k=2**31 - 1, repeat_last_n=2**31 - 1).top_k == 2**31 - 1
    # llama.cpp's samplers take C floats: 1e308 would reach them as inf, 1e-320 as 0 (a repeat penalty of 0 divides)
    with pytest.raises(TiblocalError, match=r"temperature 1e\+308 \(expected a finite number; llama.cpp takes it as a "
                                            r"32-bit float"):
        Sampling().with_value("temp", "1e308")
    with pytest.raises(TiblocalError, match=r"presence_penalty -1e\+39 \(expected a finite number"):
        Sampling(presence_penalty=-1e39)
    with pytest.raises(TiblocalError, match=r"top_p 1e-320 \(expected 0 < top_p <= 1; it is 0 as the 32-bit float"):
        Sampling(top_p=1e-320)
    with pytest.raises(TiblocalError, match=r"repeat_penalty 1e-320 \(expected > 0; 1 disables it; it is 0 as the"):
        Sampling().with_value("repeat", "1e-320")
    assert Sampling(top_p=1e-40, repeat_penalty=3e38, temperature=1e-320).top_p == 1e-40  # still not 0 or inf as floats
    # types: a str, a float where an integer goes, a bool where a number goes
    with pytest.raises(TiblocalError, match=r"temperature True \(expected a number\); top_k '5' \(expected an "
                                            r"integer\); seed 1.5 \(expected an integer\)"):
        Sampling(top_k="5", seed=1.5, temperature=True)
    assert Sampling(seed=np.int64(5), temperature=np.float32(0.5), top_k=3).seed == 5  # numpy numbers are numbers


@pytest.mark.parametrize("model", ["tiny", "bundled"])
def test_cut_before_the_penalties_changes_no_choice(model, tiny_gguf) -> None:
    """The top-k cut put before the penalties (for speed) samples exactly the tokens the plain chain samples: the same
    logits and seed through both chains, 120 steps, for greedy, top-k, top-p and every penalty that only lowers."""
    import tiblocal.engine as te
    from tiblocal.models import BUNDLED_MODEL

    settings = [
        Sampling(temperature=0),
        Sampling(seed=5),  # the defaults: temperature 0.2, top-k 40, top-p 0.9, repeat 1.1 over 64
        Sampling(temperature=1.0, top_k=5, top_p=1.0, repeat_penalty=1.5, repeat_last_n=16, seed=3),
        Sampling(temperature=0.8, top_k=100, top_p=0.95, repeat_penalty=1.05, frequency_penalty=0.5,
                 presence_penalty=0.3, seed=11),
        Sampling(temperature=0, repeat_penalty=2.0, repeat_last_n=4, frequency_penalty=1.0),
    ]
    path = tiny_gguf if model == "tiny" else BUNDLED_MODEL
    with Engine(path, EngineConfig(ctx=256, threads=1)) as e:
        lib = te._llama_cpp
        prompt = e.tokenize(LINES[0])
        for s in settings:
            e.reset()
            e._prefill(prompt)
            fast, plain = e.sampler(s, history=prompt), e.sampler(s, history=prompt, precut=False)
            try:
                for _ in range(120):
                    a = lib.llama_sampler_sample(fast, e._ctx, -1)
                    b = lib.llama_sampler_sample(plain, e._ctx, -1)
                    assert a == b, s
                    e._decode((a,))
            finally:
                e.free_sampler(fast)
                e.free_sampler(plain)


def test_a_context_llama_cpp_rounds_up_takes_the_prompts_it_holds(tiny_gguf) -> None:
    """--ctx 300: llama.cpp makes the context 512 but the batch stays 300; a 400-token prompt is decoded in batches of
    the size llama.cpp chose (it used to abort in llama.cpp's n_batch assertion)."""
    with Engine(tiny_gguf, EngineConfig(ctx=300, threads=1)) as e:
        assert (e.n_ctx, e.n_batch) == (512, 300)
        prompt = e.tokenize("hello world " * 200)[:400]
        r = Generation()
        assert len(list(e.generate_tokens(prompt, Sampling(temperature=0, max_tokens=5), r))) <= 5
        assert r.prompt_tokens == 400


@pytest.mark.parametrize("type_k", ["f16", "q8_0", "q4_0"])
def test_kv_cache_estimate_is_llama_cpps(capsys, type_k) -> None:
    """The estimate the context guard uses equals the KV cache llama.cpp allocates (its own log line, in MiB with two
    decimals)."""
    import re

    from tiblocal.engine import kv_cache_bytes
    from tiblocal.models import BUNDLED_MODEL

    with Engine(BUNDLED_MODEL, EngineConfig(ctx=2048, threads=1, parallel=2, verbose=True, cache_type_k=type_k)) as e:
        estimate = kv_cache_bytes(e.info, 2048 * 2, type_k)
    logged = re.search(r"llama_kv_cache: size = +([\d.]+) MiB", capsys.readouterr().err)
    assert logged and abs(estimate / 2**20 - float(logged.group(1))) <= 0.005


def test_contexts_that_cannot_fit_are_refused_before_llama_cpp_tries(tiny_gguf) -> None:
    from conftest import run_cli

    p = run_cli("generate", str(tiny_gguf), "--prompt", "hi", "--ctx", "2000000000", timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and "needs a KV cache of" in err and "GiB of memory" in err
    p = run_cli("serve", str(tiny_gguf), "--port", "0", "--ctx", "100000000", "--parallel", "256", timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 1 and "more than llama.cpp can address" in err and err.count("\n") == 1


def test_thread_counts_are_checked_and_clamped(tiny_gguf) -> None:
    from conftest import run_cli

    from tiblocal.engine import default_threads

    p = run_cli("generate", str(tiny_gguf), "--prompt", "hi", "--max-tokens", "2", "--threads", "100000")
    err = p.stderr.decode()
    assert p.returncode == 0 and f"--threads 100000 is more than the {default_threads()} cores" in err
    p = run_cli("generate", str(tiny_gguf), "--prompt", "hi", "--threads", "-3")
    assert p.returncode == 1 and "--threads -3 is negative" in p.stderr.decode() and p.stderr.decode().count("\n") == 1
    with Engine(tiny_gguf, EngineConfig(ctx=64, threads=0)) as e:
        assert e.threads == default_threads()


def test_long_contexts_with_rope_scaling(tmp_path) -> None:
    """--rope-scaling linear --rope-scale 4 --ctx 4096 runs a 3,000-token prompt on the bundled model (trained on 1,024
    tokens); the settings reach llama.cpp (the logits change); without scaling the same context gives a notice."""
    import lzma

    from conftest import run_cli

    from tiblocal.models import BUNDLED_MODEL

    text = lzma.open(Path(BUNDLED_MODEL).parent / "calibration" / "tibetan.txt.xz", "rt", encoding="utf-8").read()
    with Engine(BUNDLED_MODEL, EngineConfig(ctx=64, threads=1)) as e:
        prompt = e.detokenize(e.tokenize(text, add_bos=False)[:3000]).replace("\n", " ")
        plain = e.eval_logits(e.tokenize("བཀྲ་ཤིས་བདེ་ལེགས།"))
    with Engine(BUNDLED_MODEL, EngineConfig(ctx=64, threads=1, rope_scaling="linear", rope_scale=4)) as e:
        assert not np.allclose(e.eval_logits(e.tokenize("བཀྲ་ཤིས་བདེ་ལེགས།")), plain, atol=1e-3)
    long = ["generate", "--template", "raw", "--prompt", prompt, "--max-tokens", "8", "--temp", "0", "--json",
            "--ctx", "4096"]
    p = run_cli(*long, "--rope-scaling", "linear", "--rope-scale", "4", "--cache-type-k", "q8_0", timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    assert 2900 < json.loads(p.stdout)["prompt_tokens"] <= 3001 and "beyond the" not in p.stderr.decode()
    p = run_cli(*long, timeout=300)
    assert p.returncode == 0 and "--ctx 4096 is beyond the 1024 tokens tiblocal-demo.gguf was trained on" in p.stderr.decode()


@pytest.mark.parametrize("config,expected", [
    (dict(rope_scaling="ntk"), "--rope-scaling 'ntk'"),
    (dict(rope_scale=0.0), "--rope-scale 0.0 (expected a positive number)"),
    (dict(rope_freq_base=float("nan")), "--rope-freq-base nan"),
    (dict(yarn_orig_ctx=0), "--yarn-orig-ctx 0"),
    # C types: rope_freq_scale (1 / the scale) and rope_freq_base are floats, yarn_orig_ctx a uint32_t
    (dict(rope_scale=1e308), "--rope-scale 1e+308 (out of range: llama.cpp takes its inverse as a 32-bit float, "
                             "where it is 0; expected about 1e-38 to 1e38)"),
    (dict(rope_scale=1e-320), "--rope-scale 1e-320 (out of range: llama.cpp takes its inverse as a 32-bit float, "
                              "where it is inf"),
    (dict(rope_freq_base=1e39), "--rope-freq-base 1e+39 (out of range: llama.cpp takes it as a 32-bit float, where "
                                "it is inf"),
    (dict(yarn_orig_ctx=2**32 + 1), "--yarn-orig-ctx 4294967297 (expected the trained context, in tokens: 1 to "
                                    "4294967295)"),
    (dict(cache_type_k="q2_k"), "--cache-type-k 'q2_k'"),
    (dict(cache_type_v="q8_0", flash_attn="off"), "only with flash attention"),
])
def test_bad_context_settings_are_one_error(tiny_gguf, config, expected) -> None:
    with pytest.raises(TiblocalError) as e:
        Engine(tiny_gguf, EngineConfig(ctx=64, threads=1, **config))
    assert expected in str(e.value)


BACKEND_SETTINGS = [
    Sampling(temperature=0, max_tokens=40),
    Sampling(temperature=0, repeat_penalty=1.0, max_tokens=40),  # no penalties: the cut is top-k 1
    Sampling(seed=5, max_tokens=40),  # the defaults: the cut is top-k 40 + 64 before the penalties
    Sampling(temperature=0.9, repeat_penalty=1.0, top_p=0.8, seed=7, max_tokens=40),
    Sampling(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.2, ignore_eos=True, seed=3, max_tokens=40),
]


@pytest.mark.parametrize("model", ["tiny", "bundled"])
def test_backend_sampling_samples_the_same_tokens(model, tiny_gguf) -> None:
    """--backend-sampling: the cut to the top-k runs in llama.cpp's graph (attached to the sequence while the answer
    runs, detached after), the rest on the CPU, and the answers equal those sampled wholly on the CPU, seed for seed."""
    from tiblocal.models import BUNDLED_MODEL

    path = tiny_gguf if model == "tiny" else BUNDLED_MODEL
    answers = {}
    for backend in (False, True):
        with Engine(path, EngineConfig(ctx=256, threads=1, backend_sampling=backend)) as e:
            prompt = e.tokenize(LINES[0])
            for i, s in enumerate(BACKEND_SETTINGS):
                tokens, attached = [], []
                for t in e.generate_tokens(prompt, s, Generation()):
                    tokens.append(t)
                    attached.append(len(e._attached))
                assert attached == [1 if backend else 0] * len(tokens), s
                assert not e._attached
                answers.setdefault(i, []).append(tokens)
    for i, (cpu, graph) in answers.items():
        assert cpu == graph, BACKEND_SETTINGS[i]


def test_backend_sampling_leaves_settings_that_need_every_candidate_on_the_cpu(tiny_gguf) -> None:
    """A grammar, top-k 0 with a temperature, and penalties that can raise a score have no graph-side cut: sampler
    (device=True) says so (None), and generate samples them on the CPU as without the option."""
    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1, backend_sampling=True)) as e:
        assert e.sampler(Sampling(), grammar='root ::= "a"', device=True) is None
        assert e.sampler(Sampling(temperature=0.8, top_k=0), device=True) is None
        assert e.sampler(Sampling(repeat_penalty=0.9), device=True) is None
        assert e.sampler(Sampling(frequency_penalty=-0.5), device=True) is None
        chain = e.sampler(Sampling(temperature=0.8, top_k=0, repeat_penalty=1.0), device=False)
        e.free_sampler(chain)
        prompt = e.tokenize(LINES[0])
        seen = []
        for _ in e.generate_tokens(prompt, Sampling(temperature=0.8, top_k=0, seed=1, max_tokens=5), Generation()):
            seen.append(len(e._attached))
        assert seen and set(seen) == {0}


def test_next_logits_are_the_last_row_of_eval_logits_and_reuse_the_cache(tiny_gguf) -> None:
    """next_logits computes only the last position, after the cache's common prefix: the same numbers as the last row
    of eval_logits (which evaluates every position from an empty cache)."""
    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1)) as e:
        a = e.tokenize(LINES[0])
        b = a + e.tokenize(" བཀྲ་ཤིས", add_bos=False)
        full = e.eval_logits(b)[-1]
        first = e.next_logits(a)
        assert np.allclose(first, e.eval_logits(a)[-1], atol=1e-4)
        e.next_logits(a)
        after = e.next_logits(b)  # a's tokens stay in the cache
        assert e._past == list(b)
        assert np.allclose(after, full, atol=1e-4)


def test_backend_sampling_without_the_bindings_support_samples_on_the_cpu(tiny_gguf, monkeypatch, caplog) -> None:
    """An older llama-cpp-python (no llama_set_sampler): a notice, then the same tokens, sampled on the CPU."""
    import tiblocal.engine as te

    with Engine(tiny_gguf, EngineConfig(ctx=256, threads=1)) as e:
        prompt = e.tokenize(LINES[0])
        expected = list(e.generate_tokens(prompt, BACKEND_SETTINGS[2], Generation()))
    monkeypatch.delattr(te._llama_cpp, "llama_set_sampler")
    with caplog.at_level("WARNING"), Engine(tiny_gguf, EngineConfig(ctx=256, threads=1, backend_sampling=True)) as e:
        assert "has no backend sampling" in caplog.text
        got = []
        for t in e.generate_tokens(prompt, BACKEND_SETTINGS[2], Generation()):
            got.append(t)
            assert not e._attached
    assert got == expected


def test_no_ctx_given_means_2048_or_the_trained_context_if_shorter(tiny_gguf) -> None:
    """The command line's default: the tiny model (trained on 512) gets 512, with no notice about a context beyond
    its training; a --ctx given beyond it keeps the notice."""
    from conftest import run_cli

    with Engine(tiny_gguf, EngineConfig(ctx=None, threads=1)) as e:
        assert e.n_ctx == 512 == e.n_ctx_train and e.config.ctx == 512
    p = run_cli("generate", str(tiny_gguf), "--prompt", "x", "--max-tokens", "2")
    assert p.returncode == 0 and "beyond the" not in p.stderr.decode()
    p = run_cli("generate", str(tiny_gguf), "--prompt", "x", "--max-tokens", "2", "--ctx", "1024")
    assert p.returncode == 0 and "--ctx 1024 is beyond the 512 tokens" in p.stderr.decode()


def test_greedy_many_answers_as_one_prompt_at_a_time() -> None:
    """Batched greedy answers (evaluation's): more prompts than sequences, prompts longer than the batch (evaluated in
    chunks), a short limit; each answer equals the one-at-a-time greedy answer, and the cache is empty after."""
    from tiblocal.engine import Engine, EngineConfig, Generation, Sampling
    from tiblocal.models import BUNDLED_MODEL
    from tiblocal.templates import get_template

    t = get_template("alpaca")
    texts = ["བཀྲ་ཤིས་བདེ་ལེགས།", "བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ལ་ཅུང་ཙམ་བཤད་རོགས།", "ལྷ་ས་ནི་ག་པར་ཡོད།",
             "ང་ཚོ་ལྷ་སར་འགྲོ་གི་ཡོད། " * 12, "འགྲོ-བྱ་ཚིག་འདིའི་དུས་གསུམ་ནི་གང་དག་ཡིན།"]
    with Engine(BUNDLED_MODEL, EngineConfig(ctx=512, threads=2, parallel=3, batch=64)) as e:
        prompts = [e.tokenize(t.render([{"role": "user", "content": x}], add_generation_prompt=True)) for x in texts]
        assert max(map(len, prompts)) > 64  # one prompt is evaluated in chunks of the batch
        many = e.greedy_many(prompts, 24)
        assert e.greedy_many(prompts[:2], 0) == [[], []]
        one = []
        for p in prompts:
            one.append(list(e.generate_tokens(p, Sampling(temperature=0, max_tokens=24, repeat_penalty=1.0), Generation())))
            e.reset()
        with pytest.raises(PromptTooLongError):
            e.greedy_many([[1] * 600], 4)
    assert many == one and all(0 < len(a) <= 24 for a in many)

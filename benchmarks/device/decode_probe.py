"""Where a step of 16 slots goes on the GPU: tiblocal's context decoding alone against the server's decode loop.

For 16 sequences of a 128-token prompt, on tiblocal's own context (the server's sizes, then llama-batched-bench's
n_batch/n_ubatch): a raw loop of llama_decode + llama_synchronize of 16 random tokens (ms a step, split into the call
and the wait), then the Scheduler's steady state; each with how often llama.cpp reused the graph (its perf counters)
and what it logged meanwhile (its CUDA backend logs "CUDA Graph id N reused" at debug level when it relaunches one).
Compare with llama-batched-bench -npp 128 -ntg 128 -npl 16 on the same build (with and without
GGML_CUDA_DISABLE_GRAPHS=1), as docs/serving.md reports.

    LLAMA_CPP_LIB_PATH=build/bin python benchmarks/device/decode_probe.py MODEL.gguf THREADS N_GPU_LAYERS
"""
import random, sys, time, collections
import tiblocal.engine as te
from tiblocal.engine import Engine, EngineConfig, Sampling
from tiblocal.serve.slots import Scheduler, Job
path, threads = sys.argv[1], int(sys.argv[2])
N = 16
logs = collections.Counter(); first = []
def cb(level, text, ud):
    t = text.decode(errors="replace").strip()[:90]
    logs[level] += 1
    if len(first) < 12 and t not in first: first.append(t)
ccb = None
def perf(e):
    d = te._llama_cpp.llama_perf_context(e._ctx); return d.n_reused
def hook(lib):
    global ccb
    ccb = lib.llama_log_callback(cb); lib.llama_log_set(ccb, None)

def sched_loop(e, label):
    sch = Scheduler(e)
    prompt = e.tokenize("བོད་ཀྱི་ལོ་རྒྱུས་སྐོར་ཅུང་ཙམ་ཤོད། " * 8)[:128]
    for _ in range(N): sch.submit(Job(prompt=prompt, sampling=Sampling(max_tokens=100, ignore_eos=True, seed=1, temperature=0.7), sink=lambda ev: None))
    sch.turn()
    while any(s.pending for s in sch.slots): sch.turn()
    hook(te._llama_cpp); logs.clear(); first.clear()
    r0 = perf(e); t0 = time.perf_counter(); n = 0
    while all(s.job is not None for s in sch.slots):
        sch.turn(); n += 1
    dt = time.perf_counter() - t0
    print(f"{label}: scheduler {dt/n*1000:.2f} ms/step {N*n/dt:.0f} tok/s reused {perf(e)-r0}/{n} logs {dict(logs)} {first[:6]}", flush=True)
    sch.stop()

def pure_loop(e, label, pos0=128, steps=100):
    lib = te._llama_cpp
    b = lib.llama_batch_init(N, 0, 1)
    nv = e.n_vocab if hasattr(e, "n_vocab") else 32000
    mem = lib.llama_get_memory(e._ctx); lib.llama_memory_clear(mem, True)
    # prompts: N x pos0 random tokens, one sequence each
    for s in range(N):
        b.n_tokens = 0
        for i in range(0, pos0, 16):
            b.n_tokens = 0
            for j in range(16):
                k = b.n_tokens; b.token[k] = random.randrange(nv); b.pos[k] = i + j; b.n_seq_id[k] = 1; b.seq_id[k][0] = s; b.logits[k] = 0; b.n_tokens += 1
            assert lib.llama_decode(e._ctx, b) == 0
    lib.llama_synchronize(e._ctx)
    hook(lib); logs.clear(); first.clear()
    r0 = perf(e); tdec = tsync = 0.0; t0 = time.perf_counter()
    for i in range(steps):
        b.n_tokens = 0
        for s in range(N):
            k = b.n_tokens; b.token[k] = random.randrange(nv); b.pos[k] = pos0 + i; b.n_seq_id[k] = 1; b.seq_id[k][0] = s; b.logits[k] = 1; b.n_tokens += 1
        t = time.perf_counter(); assert lib.llama_decode(e._ctx, b) == 0; t2 = time.perf_counter(); lib.llama_synchronize(e._ctx); t3 = time.perf_counter()
        tdec += t2 - t; tsync += t3 - t2
    dt = time.perf_counter() - t0
    print(f"{label}: pure decode {dt/steps*1000:.2f} ms/step (decode {tdec/steps*1000:.2f} + sync {tsync/steps*1000:.2f}) {N*steps/dt:.0f} tok/s reused {perf(e)-r0}/{steps} logs {dict(logs)} {first[:6]}", flush=True)
    lib.llama_batch_free(b)

for label, kw in (("ours", dict(ctx=320)), ("bb-like", dict(ctx=512, batch=2048))):
    e = Engine(path, EngineConfig(parallel=N, n_gpu_layers=int(sys.argv[3]), flash_attn="on", threads=threads, **kw))
    pure_loop(e, label)
    sched_loop(e, label)
    e.close()

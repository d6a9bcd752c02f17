"""The serving engine without HTTP (docs/design.md §7): slot isolation, continuous batching = each request alone,
prefix states = full prefill, stop/abort/queueing, device sampling (distribution, seeds, penalties), and on a GPU
(``MAMBA2_TEST_DEVICE=cuda``) CUDA-graph decoding = eager decoding = argmax of a full fp32 forward."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

from conftest import rel_err
from mamba2 import Mamba2Config, Mamba2LM
from mamba2.generation import generate
from mamba2.layers.slots import gather_rows
from mamba2.serving import Engine, SamplingParams
from mamba2.serving.sampling import sample, uniform_noise

DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")
LAYOUTS = [None, "mamba2,attention+mlp,mamba1", "mamba1+mlp,mamba2,mamba1"]   # packed, left-padded, packed with Mamba-1


def _model(layout=None, dtype=torch.float64, vocab=61, seed=0):
    torch.manual_seed(seed)
    c = Mamba2Config(d_model=32, n_layer=3, vocab_size=vocab, d_state=16, headdim=8, chunk_size=8, layout=layout,
                     d_intermediate=48 if layout else 0)
    m = Mamba2LM(c)
    with torch.no_grad():
        for p in m.parameters():          # larger, more varied weights than the init: outputs depend on the input
            p.add_(torch.randn_like(p) * 0.3)
    return m.to(DEVICE, dtype).eval()


def _run(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list[int]]:
    """Step the engine, adding requests at the given step numbers; returns each request's tokens."""
    out: dict[str, list[int]] = {}
    step = 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(prompt, params, request_id=rid)
            out[rid] = []
        for o in engine.step():
            out[o.request_id].extend(o.new_tokens)
        step += 1
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("as_slice", [False, True])
def test_decode_step_reads_and_writes_only_the_named_slots(layout, as_slice):
    m = _model(layout)
    pool = m.empty_cache(5, max_len=12)
    for state in pool.layers:                   # non-zero contents everywhere, so a stray write would show
        for f in dataclasses.fields(state):
            v = getattr(state, f.name)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.normal_()
    before = [gather_rows(s, torch.arange(5, device=DEVICE)) for s in pool.layers]
    slots, named, others = torch.tensor([3, 1], device=DEVICE), [1, 3], (0, 2, 4)
    if as_slice:
        slots, named, others = slice(1, 3), [1, 2], (0, 3, 4)
    with torch.no_grad():
        m.decode_step(torch.tensor([5, 9], device=DEVICE), pool, slots)
    for old, new in zip(before, pool.layers):
        for f in dataclasses.fields(new):
            a, b = getattr(old, f.name), getattr(new, f.name)
            if not isinstance(a, torch.Tensor):
                continue
            for row in others:
                assert torch.equal(a[row], b[row]), (type(new).__name__, f.name, row)
            assert not torch.equal(a[named], b[named]), (type(new).__name__, f.name)


@pytest.mark.parametrize("bad", [slice(None, 2), slice(-2, None), slice(0, 4, 2), slice(3, 1)])
def test_a_slice_of_slots_other_than_consecutive_rows_is_refused(bad):
    m = _model(LAYOUTS[0])
    pool = m.empty_cache(5, max_len=12)
    with torch.no_grad(), pytest.raises(ValueError, match=r"slice\(start, stop\) of consecutive rows"):
        m.decode_step(torch.tensor([5, 9], device=DEVICE), pool, bad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_continuous_batching_equals_each_request_alone(layout):
    """Requests arriving at random steps into 3 slots (so some wait), greedy and seeded sampling mixed: each
    gets exactly the tokens it gets alone."""
    m = _model(layout)
    rng = random.Random(0)
    arrivals: dict[int, list] = {}
    requests = []
    for i in range(9):
        prompt = [rng.randrange(61) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 0.8, 1.3]),
                                top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 5]), seed=rng.randrange(1000))
        requests.append((f"r{i}", prompt, params))
        arrivals.setdefault(rng.randint(0, 10), []).append(requests[-1])
    together = _run(Engine(m, max_batch=3, max_len=40), arrivals)
    for rid, prompt, params in requests:
        alone = _run(Engine(m, max_batch=1, max_len=40), {0: [(rid, prompt, params)]})
        assert together[rid] == alone[rid], rid
        assert len(alone[rid]) == params.max_tokens


def test_generate_matches_the_plain_cached_forward():
    """generate() on the engine = the textbook loop (prefill with a cache, then one token at a time)."""
    m = _model()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        cache = m.empty_cache(1)
        logits = m(torch.tensor([prompt], device=DEVICE), cache=cache)[:, -1]
        ref = []
        for _ in range(10):
            t = logits[:, :61].argmax(-1)
            ref.append(int(t))
            logits = m(t[:, None], cache=cache)[:, -1]
    assert generate(m, [prompt], 10, temperature=0)[0] == ref


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefix_state_equals_full_prefill(layout):
    m = _model(layout)
    header = [7, 3, 3, 8, 1, 2, 9, 4, 4, 4, 5]
    engine = Engine(m, max_batch=2, max_len=40)
    prefix = engine.make_prefix(header)
    params = SamplingParams(max_tokens=8, temperature=0)
    for tail in ([], [6], [2, 5, 7, 1]):
        full = _run(Engine(m, max_batch=1, max_len=40), {0: [("a", header + tail, params)]})["a"]
        engine.add_request(header + tail, params, request_id="b", prefix=prefix)
        got = []
        while engine.has_work():
            for o in engine.step():
                got.extend(o.new_tokens)
        assert got == full, tail
    with pytest.raises(ValueError, match="does not start with the prefix"):
        engine.add_request([1, 2, 3], params, prefix=prefix)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_prompt_past_max_prefill_tokens_is_prefilled_in_pieces_with_the_same_tokens(layout, monkeypatch):
    """A prompt (and a prefix, and the part after one) longer than max_prefill_tokens runs in forwards of at most
    that many tokens, carrying the state (so its activations stay bounded), and gives the greedy tokens and
    first logits of one whole prefill; prompts that fit are still prefilled packed together."""
    m = _model(layout)
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(0, 61, (45,), generator=g).tolist(), [5, 6, 7]
    params = SamplingParams(max_tokens=6, temperature=0)
    whole = _run(Engine(m, max_batch=2, max_len=64), {0: [("a", long, params), ("b", short, params)]})
    lengths, real_forward = [], Mamba2LM.forward

    def forward(self, ids, *args, **kw):
        lengths.append(ids.shape[1])
        return real_forward(self, ids, *args, **kw)

    monkeypatch.setattr(Mamba2LM, "forward", forward)
    pieces = Engine(m, max_batch=2, max_len=64, max_prefill_tokens=16)
    assert _run(pieces, {0: [("a", long, params), ("b", short, params)]}) == whole
    assert lengths == [16, 16, 13, 3]                        # the long prompt in pieces, then the short one
    lengths.clear()
    prefix = pieces.make_prefix(long[:40])                    # a long prefix, then 5 tokens after it
    assert lengths == [16, 16, 8]
    pieces.add_request(long, params, request_id="c", prefix=prefix)
    got = []
    while pieces.has_work():
        for o in pieces.step():
            got.extend(o.new_tokens)
    assert got == whole["a"]
    with torch.inference_mode():
        cache = m.empty_cache(1)
        one = m(torch.tensor([long], device=DEVICE), cache=m.empty_cache(1), logits_to_keep=1)[:, -1]
        assert rel_err(pieces._prefill(torch.tensor([long], device=DEVICE), cache), one) < 1e-12
    with pytest.raises(ValueError, match="max_prefill_tokens must be an integer >= 1, got 0"):
        Engine(m, max_prefill_tokens=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_prefix_extended_turn_by_turn_equals_one_prefill(layout):
    """A conversation's state grown by make_prefix(ids, after=…) (generate --interactive) is the state of one
    prefill of the whole conversation: same logits, same greedy continuation."""
    m = _model(layout)
    engine = Engine(m, max_batch=1, max_len=40)
    turns = [[7, 3, 3], [8, 1, 2, 9], [4], [4, 4, 5, 6]]
    ids, prefix = [], None
    for t in turns:
        ids = ids + t
        prefix = engine.make_prefix(ids, after=prefix)
    whole = engine.make_prefix(ids)
    torch.testing.assert_close(prefix.logits, whole.logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(prefix.cache.layers, whole.cache.layers):
        for name, t in vars(a).items():
            if isinstance(t, torch.Tensor):
                torch.testing.assert_close(t, getattr(b, name), rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="must extend the prefix's 12 tokens"):
        engine.make_prefix(ids[:5], after=prefix)
    with pytest.raises(ValueError, match="must extend the prefix's 12 tokens"):
        engine.make_prefix(ids, after=prefix)


def test_stop_tokens_abort_and_slot_reuse():
    m = _model()
    greedy = generate(m, [[4, 4, 4]], 15, temperature=0)[0]
    stop = greedy[4]
    engine = Engine(m, max_batch=1, max_len=64)
    a = engine.add_request([4, 4, 4], SamplingParams(max_tokens=15, temperature=0, stop_token_ids=(stop,)))
    b = engine.add_request([4, 4, 4], SamplingParams(max_tokens=15, temperature=0), stream=True)
    got: dict[str, list[int]] = {a: [], b: []}
    reasons = {}
    while engine.has_work():
        for o in engine.step():
            got[o.request_id].extend(o.new_tokens)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        if engine.num_running and len(got[b]) >= 3:
            assert engine.abort(b)
    assert got[a] == greedy[:greedy.index(stop) + 1] and reasons[a] == "stop"
    assert got[b] == greedy[:3]                                          # aborted while running
    assert not engine.abort(b) and not engine.has_work()
    again = _run(engine, {0: [("c", [4, 4, 4], SamplingParams(max_tokens=15, temperature=0))]})
    assert again["c"] == greedy                                          # the reused slot starts clean


def test_bad_requests_are_refused_before_anything_runs():
    m = _model("mamba2,attention+mlp,mamba1")
    engine = Engine(m, max_batch=2, max_len=16)
    for prompt, match in (([], "empty"), ([1, 61], "outside the vocabulary"), ([1.0], "integers"),
                          ("abc", "sequence of token ids"), ([True], "integers")):
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt)
    with pytest.raises(ValueError, match="exceeds the engine's max_len 16"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=8))
    engine.add_request([1] * 10, SamplingParams(max_tokens=7))
    engine.add_request([1], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], request_id="x")
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, max_batch=0)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cuda_graphs needs a model on a CUDA device"):
            Engine(m, cuda_graphs=True)


def test_sampling_follows_the_filtered_distribution():
    """Frequencies of the drawn tokens over many independent positions match softmax(logits / T) restricted to
    the top-k / top-p / min-p set and renormalised (within 4 standard errors)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.0])
    n = 20000
    for kw, keep in ((dict(), 8), (dict(top_k=3), 3), (dict(top_p=0.8), None), (dict(min_p=0.3), None)):
        T = 0.7
        full = lambda v, dt: torch.full((n,), v, dtype=dt)
        drawn = sample(logits.repeat(n, 1), vocab_size=8, temperature=full(T, torch.float32),
                       top_k=full(kw.get("top_k", 0), torch.int64), top_p=full(kw.get("top_p", 1.0), torch.float32),
                       min_p=full(kw.get("min_p", 0.0), torch.float32), seed=full(11, torch.int64),
                       position=torch.arange(n))
        p = torch.softmax(logits / T, -1)
        order = p.argsort(descending=True)
        if "top_p" in kw:
            cum = p[order].cumsum(0) - p[order]
            keep = int((cum < kw["top_p"]).sum())
        if "min_p" in kw:
            keep = int((p >= kw["min_p"] * p.max()).sum())
        q = torch.zeros(8)
        q[order[:keep]] = p[order[:keep]] / p[order[:keep]].sum()
        freq = torch.bincount(drawn, minlength=8).double() / n
        se = (q * (1 - q) / n).sqrt().double()
        assert ((freq - q).abs() <= 4 * se + 1e-12).all(), (kw, freq, q)


def test_uniform_noise_is_a_pure_function_and_uniform():
    seed = torch.tensor([0, 1, 2 ** 40 + 5, 0])
    pos = torch.tensor([0, 0, 3, 1])
    u = uniform_noise(seed, pos, 50000)
    assert torch.equal(u, uniform_noise(seed, pos, 50000))
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.std().item() - (1 / 12) ** 0.5) < 0.005
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[3])      # seed and position both matter
    assert (u[0] - u[3]).abs().mean() > 0.2


def test_repetition_penalty_discourages_seen_tokens():
    m = _model(vocab=61)
    plain = generate(m, [[4, 4, 4]], 30, temperature=0)[0]
    assert len(set(plain)) < 30                                              # the greedy loop repeats itself
    pen = generate(m, [[4, 4, 4]], 30, temperature=0, repetition_penalty=1e6)[0]
    assert len(set(pen)) == 30 and 4 not in pen                              # nothing seen is chosen again


@pytest.mark.skipif(DEVICE != "cuda", reason="needs MAMBA2_TEST_DEVICE=cuda (a GPU)")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_and_the_fp32_forward(layout, dtype):
    m = _model(layout, dtype=dtype)
    prompts = [[random.Random(i).randrange(61) for _ in range(5 + 3 * i)] for i in range(3)]   # bucket 4
    graphs = generate(m, prompts, 12, temperature=0, cuda_graphs=True)
    eager = generate(m, prompts, 12, temperature=0, cuda_graphs=False)
    assert graphs == eager
    if dtype == torch.float32:
        m64 = _model(layout, dtype=torch.float32)
        with torch.no_grad():
            torch.backends.cuda.matmul.allow_tf32 = False
            for p, row in zip(prompts, graphs):
                ids = torch.tensor([p + row], device=DEVICE)
                full = m64(ids)[0, len(p) - 1:-1, :61].argmax(-1).tolist()
                assert full == row
    sampled = generate(m, prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0),
                       cuda_graphs=True)
    again = generate(m, prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0),
                     cuda_graphs=False)
    assert sampled == again


@pytest.mark.skipif(DEVICE != "cuda", reason="needs MAMBA2_TEST_DEVICE=cuda (a GPU)")
def test_graphs_are_captured_again_when_the_kernels_change():
    """A graph replays the kernels of its capture: after a change of the kernel mode (or of a tuning), the engine
    captures anew (CASES 23) and the tokens are those of the eager step under the new mode."""
    from mamba2.kernels import kernels
    from mamba2.ssd.triton.backend import TUNING

    m = _model(dtype=torch.bfloat16)
    prompts = [[random.Random(i).randrange(61) for _ in range(5 + 3 * i)] for i in range(3)]
    eager = generate(m, prompts, 12, temperature=0, cuda_graphs=False)
    with kernels("off"):
        eager_off = generate(m, prompts, 12, temperature=0, cuda_graphs=False)
    engine = Engine(m, max_batch=4, cuda_graphs=True)

    def run():
        rids = [engine.add_request(p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts]
        out = {r: [] for r in rids}
        while engine.has_work():
            for o in engine.step():
                out[o.request_id] += o.new_tokens
        return [out[r] for r in rids], dict(engine.graphs._graphs)

    first, graphs = run()
    with kernels("off"):
        off, off_graphs = run()
    with TUNING.tuned(step=dict(num_warps=2)):          # the SSD decode-step kernel
        tuned, tuned_graphs = run()
    assert first == eager and off == eager_off and tuned == eager
    assert all(off_graphs[k] is not graphs[k] and tuned_graphs[k] is not off_graphs[k] for k in graphs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_states_equal_separate_prefills_in_model_dtypes(dtype):
    """The engine's packed prefill in fp32 and bf16 (the Triton kernels on a GPU, the chunked torch code on CPU):
    every layer's state per prompt equals the prompt prefilled alone — in fp32 within the budget of
    docs/design.md §4, in bf16 as close to the fp64 model's state as the separate prefill is (both round their
    activations to bf16, in different orders) — for prompts that start mid-chunk and are shorter than d_conv."""
    m = _model(dtype=dtype)
    m64 = _model(dtype=torch.float64)
    lengths = [1, 2, 9, 8, 17, 30, 5]
    rng = random.Random(3)
    prompts = [[rng.randrange(61) for _ in range(n)] for n in lengths]
    cu = torch.tensor([0] + lengths).cumsum(0)
    with torch.inference_mode():
        cache = m.empty_cache(len(prompts))
        logits = m(torch.tensor([sum(prompts, [])], device=DEVICE), cu_seqlens=cu, cache=cache, logits_to_keep=1)
        for k, p in enumerate(prompts):
            ids = torch.tensor([p], device=DEVICE)
            alone, exact = m.empty_cache(1), m64.empty_cache(1)
            ref = m(ids, cache=alone, logits_to_keep=1)
            ref64 = m64(ids, cache=exact, logits_to_keep=1)
            pairs = [(logits[k], ref[0], ref64[0])]
            pairs += [(a.ssm[k], b.ssm[0], e.ssm[0]) for a, b, e in zip(cache.layers, alone.layers, exact.layers)]
            pairs += [(a.conv[k], b.conv[0], e.conv[0]) for a, b, e in zip(cache.layers, alone.layers, exact.layers)]
            for packed, separate, exact_value in pairs:
                if dtype == torch.float32:
                    assert rel_err(packed, separate) <= 1e-4, k
                else:
                    assert rel_err(packed, exact_value) <= 2 * rel_err(separate, exact_value) + 2e-3, k


def test_admissions_wait_for_their_share_and_change_no_tokens():
    """prefill_share: while a request decodes, a new one waits until the time since the last admission covers
    (1 - share) / share of its cost (measured); with nothing decoding, or share 1, admission is immediate. The
    tokens are the same whenever a request is admitted; warm_up changes nothing either."""
    m = _model()
    params = SamplingParams(max_tokens=30, temperature=0)
    outs = {}
    for share in (1.0, 1e-6):
        engine = Engine(m, max_batch=3, max_len=64, prefill_share=share)
        engine.warm_up()
        assert engine.num_running == 0 and engine.num_waiting == 0
        engine.add_request([1, 2, 3], params, request_id="a")
        engine.step()
        assert engine.num_running == 1                                  # nothing was decoding: at once
        engine.add_request([4, 5], params, request_id="b")
        engine.step()
        waited = engine.num_waiting
        got: dict[str, list[int]] = {"a": [], "b": []}
        while engine.has_work():
            for o in engine.step():
                got[o.request_id].extend(o.new_tokens)
        outs[share] = (waited, got)
    assert outs[1.0][0] == 0 and outs[1e-6][0] == 1
    assert outs[1.0][1] == outs[1e-6][1] and len(outs[1.0][1]["b"]) == 30
    with pytest.raises(ValueError, match="prefill_share must be in"):
        Engine(m, prefill_share=0)

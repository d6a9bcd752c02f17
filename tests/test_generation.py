"""Generation: batched = alone (docs/design.md §5.9), padded vocab never sampled (19), sampling options, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba2 import Mamba2Config, Mamba2LM
from mamba2.generation import generate
from mamba2.serving.sampling import SamplingParams, sample


def sample_next(logits, *, vocab_size, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0):
    """:func:`sample` with the same settings on every row and a distinct position per row."""
    b = logits.shape[0]
    full = lambda v, dt: torch.full((b,), v, dtype=dt)
    return sample(logits, vocab_size=vocab_size, temperature=full(temperature, torch.float32),
                  top_k=full(top_k, torch.int64), top_p=full(top_p, torch.float32), min_p=full(min_p, torch.float32),
                  seed=full(seed, torch.int64), position=torch.arange(b))


def _model(vocab=61, seed=0):
    torch.manual_seed(seed)
    c = Mamba2Config(d_model=32, n_layer=2, vocab_size=vocab, d_state=8, headdim=8, chunk_size=8)
    m = Mamba2LM(c).eval()
    with torch.no_grad():
        for blk in m.backbone.layers:
            blk.mixer.D.normal_()
    return m


def test_batched_greedy_equals_each_row_alone():
    m = _model()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5], [3, 5, 8], [9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6]]
    batched = generate(m, prompts, 12, temperature=0)
    for p, row in zip(prompts, batched):
        assert row == generate(m, [p], 12, temperature=0)[0]
        assert len(row) == 12


def test_padded_vocabulary_rows_never_sampled():
    m = _model(vocab=50)                            # padded to 64
    assert m.config.padded_vocab_size == 64
    with torch.no_grad():                           # make the padded rows overwhelmingly likely
        m.backbone.embedding.weight[50:] = 50.0
    gen = torch.Generator().manual_seed(0)
    out = generate(m, [[1, 2, 3]] * 4, 30, temperature=1.5, generator=gen)
    assert all(0 <= t < 50 for row in out for t in row)
    logits = torch.zeros(3, 64)
    logits[:, 50:] = 100.0
    assert (sample_next(logits, vocab_size=50, temperature=0) < 50).all()


def test_sampling_is_seeded_and_options_behave():
    m = _model()
    a = generate(m, [[1, 2]], 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(m, [[1, 2]], 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    greedy = generate(m, [[1, 2]], 10, temperature=0)
    assert generate(m, [[1, 2]], 10, top_k=1, generator=torch.Generator().manual_seed(1)) == greedy
    assert generate(m, [[1, 2]], 10, top_p=1e-6, generator=torch.Generator().manual_seed(1)) == greedy


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    assert set(sample_next(logits, vocab_size=4, top_k=2).tolist()) == {0, 1}
    assert set(sample_next(logits, vocab_size=4, top_p=0.7).tolist()) == {0, 1}
    assert set(sample_next(logits, vocab_size=4, top_p=0.9).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, vocab_size=4, min_p=0.5).tolist()) == {0, 1}
    assert set(sample_next(logits, vocab_size=4, min_p=0.2).tolist()) == {0, 1, 2}


def test_eos_stops_and_streaming_sees_every_token():
    m = _model()
    greedy = generate(m, [[4, 4, 4]], 15, temperature=0)[0]
    eos = greedy[5]
    seen = []
    out = generate(m, [[4, 4, 4]], 15, temperature=0, eos_token_id=eos, on_token=seen.append)
    assert out[0] == greedy[:greedy.index(eos) + 1]
    assert [s[0] for s in seen] == out[0]


@pytest.mark.parametrize("prompts, match", [([[]], "empty"), ([[1, 99]], "outside the vocabulary"), ([], "no prompts"),
                                            ([[1.5, 2]], "token ids must be integers")])
def test_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        generate(_model(), prompts, 3)


def test_prompts_as_a_tensor_or_a_numpy_array():
    """A (batch, L) integer tensor or numpy array is one prompt per row, numpy integers are ints; other dtypes
    are refused naming them."""
    np = pytest.importorskip("numpy")
    m = _model()
    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    want = generate(m, ids.tolist(), 3, temperature=0)
    for prompts in (ids, ids.numpy(), list(ids.numpy()), [list(row) for row in ids.numpy()]):
        assert generate(m, prompts, 3, temperature=0) == want
    for bad, match in ((ids.float(), "prompts must hold integer token ids, got a tensor of dtype torch.float32"),
                       (ids.numpy() > 2, "prompts must hold integer token ids, got a numpy array of dtype bool"),
                       ([np.array([1.5, 2.0])], "a prompt must hold integer token ids, got a numpy array of dtype "
                                                "float64"),
                       (torch.tensor(3), "prompts must be a list of token-id lists, got Tensor"),
                       (np.array(3), "prompts must be a list of token-id lists, got ndarray"),
                       ([torch.tensor(3)], r"one list per prompt")):
        with pytest.raises(ValueError, match=match):
            generate(m, bad, 3)


@pytest.mark.parametrize("kw, match", [(dict(top_p=0.0), "top_p"), (dict(temperature=-1), "temperature"),
                                       (dict(temperature=float("nan")), "temperature"), (dict(top_k=-2), "top_k"),
                                       (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
                                       (dict(max_tokens=-2), "max_tokens"), (dict(seed=-1), "seed"),
                                       (dict(max_tokens=True), "max_tokens")])
def test_bad_sampling_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
    if "seed" in kw:                                       # generate() draws seeds itself
        return
    with pytest.raises(ValueError, match=match.replace("max_tokens", "max_new_tokens")):
        generate(_model(), [[1, 2]], kw.pop("max_tokens", 3), **kw)


def test_vocab_size_cap_keeps_samples_decodable():
    """A model vocabulary larger than the tokenizer's: ids the tokenizer cannot decode are never sampled."""
    m = _model(vocab=60)
    with torch.no_grad():
        m.backbone.embedding.weight[50:60] = 50.0          # make the undecodable ids the most likely
    out = generate(m, [[1, 2]] * 3, 25, temperature=1.5, generator=torch.Generator().manual_seed(0), vocab_size=50)
    assert all(t < 50 for row in out for t in row)
    assert any(t >= 50 for row in generate(m, [[1, 2]], 25, temperature=0) for t in row)



def test_an_engine_refuses_a_model_moved_or_cast_after_it_was_made():
    """Its state slots (and graphs) belong to the weights it was made for: a cast model is a clear error at the next
    step, not a stale replay or a dtype clash deep inside; generate() makes a new engine for it."""
    from mamba2.serving import Engine

    m = _model()
    engine = Engine(m, max_batch=2)
    engine.add_request([3, 1, 4], SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    m.to(torch.float64)
    with pytest.raises(RuntimeError, match="moved or cast .* after this Engine was made: .* make a new Engine"):
        engine.step()
    assert len(generate(m, [[3, 1, 4]], 3, temperature=0)[0]) == 3


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=40), st.lists(st.sampled_from(["\ufffd", "é", "a", "\n\n", "a\ufffd", "éa", "\u00e9\n", "ab\ufffd",
                                                          "b"]),
                                         max_size=3), st.integers(1, 4))
def test_streamed_text_is_the_final_text_cut_at_its_first_stop(data, stops, per_add):
    """Bytes arriving a few at a time (a character split across adds included): the released pieces plus
    finish() are the whole decoded text cut at its first stop string, and a stop is matched only in final text
    (a U+FFFD stop never matches a character whose last byte is still to come)."""
    from mamba2.serving.text import TextStream, cut_at_stop
    from mamba2.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    stream = TextStream(tok, stops)
    ids, out = list(data), []
    for i in range(0, len(ids), per_add):
        out.append(stream.add(ids[i:i + per_add]))
        if stream.stopped:
            break
    out.append(stream.finish())
    want, found = cut_at_stop(tok.decode(ids[:len(stream.ids)]), stops)
    assert "".join(out) == want == stream.text and stream.stopped == found
    if stream.stopped:      # it stopped at the first stop of the whole text, never earlier
        assert want == cut_at_stop(tok.decode(ids), stops)[0]


def test_a_replacement_character_stop_waits_for_the_character():
    from mamba2.serving.text import TextStream
    from mamba2.tokenizer import ByteTokenizer

    s = TextStream(ByteTokenizer(), ["\ufffd"])
    assert [s.add([i]) for i in "aé".encode()] == ["a", "", "é"] and not s.stopped     # é's first byte: no stop
    assert s.add([0xFF]) == "" and not s.stopped
    assert s.add([0x62]) == "" and s.stopped and s.text == "aé"   # an invalid byte is final once b follows it
    s = TextStream(ByteTokenizer(), skip_ids=[0])                  # an EOS id is not text
    assert s.add([104, 0, 105]) == "hi" and s.ids == [104, 105] and s.finish() == ""
    s = TextStream(ByteTokenizer(), ["ab\ufffd", "b"])
    assert s.add(list(b"ab\xff")) == "a" and s.stopped and s.text == "a" and s.finish() == ""


def test_top_k_minus_one_is_off_and_vocab_size_must_be_positive():
    m, g = _model(), lambda: torch.Generator().manual_seed(3)
    assert generate(m, [[1, 2]], 8, top_k=-1, generator=g()) == generate(m, [[1, 2]], 8, top_k=0, generator=g())
    assert SamplingParams(top_k=-1).top_k == 0
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"vocab_size must be a positive integer .*got"):
            generate(m, [[1, 2]], 3, vocab_size=bad)

"""The decode step issues no host sync: a forward with a cache and validated ids (``check_ids=False``) never
reads a tensor back to the host, so on a GPU the step stays queued and can be captured. On CPU every way of
reading a tensor's value on the host is counted; with ``MAMBA2_TEST_DEVICE=cuda`` the step also runs under
``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call.
"""

from __future__ import annotations

import os

import pytest
import torch

from mamba2 import Mamba2Config, Mamba2LM
from mamba2.generation import generate

DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")
READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts of every host read of a tensor's value (Tensor.item, .tolist, bool(t), int(t), …)."""
    counts = dict.fromkeys(READS, 0)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def _model(layout=None, **kw):
    torch.manual_seed(0)
    c = Mamba2Config(d_model=32, n_layer=3, vocab_size=64, d_state=16, headdim=8, chunk_size=8, layout=layout,
                     d_intermediate=48 if layout else 0, **kw)
    return Mamba2LM(c).to(DEVICE).eval()


@pytest.mark.parametrize("layout", [None, "mamba2,attention+mlp,mamba1"])
def test_decode_step_reads_nothing_back(host_reads, layout):
    model = _model(layout)
    ids = torch.randint(0, 64, (3, 9), device=DEVICE)
    with torch.no_grad():
        cache = model.empty_cache(3)
        model(ids[:, :8], cache=cache, logits_to_keep=1)
        before = dict(host_reads)
        for t in range(8, 9):
            logits = model(ids[:, t:t + 1], cache=cache, check_ids=False)
        nxt = logits[:, -1].argmax(-1)
        model(nxt[:, None], cache=cache, check_ids=False)
    assert host_reads == before, {k: host_reads[k] - before[k] for k in READS}


def test_the_id_check_is_the_one_read_and_still_on_by_default(host_reads):
    model = _model()
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 4), device=DEVICE))
    assert host_reads["tolist"] == 1 and sum(host_reads.values()) == 1, host_reads
    with pytest.raises(ValueError, match=r"token id 64 is outside the vocabulary \[0, 64\)"):
        model(torch.tensor([[1, 64]], device=DEVICE))


def test_generate_reads_back_once_per_request_not_per_token(host_reads):
    """Greedy generation without streaming or eos: the same number of host reads for 2 and for 12 new tokens
    (the prompt's padding check and the final copy), and the same tokens as streaming them one by one."""
    model = _model()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    totals = []
    for n in (2, 12):
        before = sum(host_reads.values())
        out = generate(model, prompts, n, temperature=0)
        totals.append(sum(host_reads.values()) - before)
    assert totals[0] == totals[1], totals
    streamed = []
    again = generate(model, prompts, 12, temperature=0, on_token=streamed.append)
    assert again == out and [list(r) for r in zip(*streamed)] == out


@pytest.mark.skipif(DEVICE != "cuda", reason="needs MAMBA2_TEST_DEVICE=cuda (a GPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_step_under_sync_debug_error(dtype):
    model = _model().to(dtype)
    ids = torch.randint(0, 64, (4, 9), device=DEVICE)
    with torch.no_grad():
        cache = model.empty_cache(4)
        model(ids[:, :8], cache=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(ids[:, 8:], cache=cache, check_ids=False)
            model(logits[:, -1].argmax(-1)[:, None], cache=cache, check_ids=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def test_packed_prefill_reads_the_boundaries_once_whatever_the_layers(host_reads):
    """A packed prefill (cu_seqlens on the host, a cache, validated ids) reads the boundaries once, in the LM, and
    nothing per layer: 1 and 6 layers cost the same number of host reads (on a GPU each read would stall it)."""
    counts = []
    for n_layer, layout in ((1, None), (6, None), (6, "mamba1,mamba2,mamba1,mamba2,mamba1,mamba2"),
                            (6, "mamba2,attention,mamba1,mamba2,attention,mamba2")):
        torch.manual_seed(0)
        model = Mamba2LM(Mamba2Config(d_model=32, n_layer=n_layer, vocab_size=64, d_state=16, headdim=8,
                                      chunk_size=8, layout=layout)).to(DEVICE).eval()
        ids = torch.randint(0, 64, (1, 23), device=DEVICE)
        cu = torch.tensor([0, 3, 4, 15, 23])
        with torch.no_grad():
            cache = model.empty_cache(4)
            before = sum(host_reads.values())
            model(ids, cu_seqlens=cu, cache=cache, logits_to_keep=1, check_ids=False)
            counts.append(sum(host_reads.values()) - before)
    assert counts[0] == counts[1] == counts[2] == counts[3] <= 1, counts


def test_the_loss_checks_ids_and_targets_in_one_read_and_none_without_check_ids(host_reads):
    """loss() checks input_ids and targets (each in [0, vocab_size), targets also -100) with one host read in all;
    the trainer's check_ids=False step reads nothing back (its token streams were checked once)."""
    model = _model("mamba2,attention+mlp,mamba1")
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    targets = torch.randint(0, 64, (2, 6), device=DEVICE)
    targets[0, :3] = -100
    model.loss(ids, targets).backward()
    assert host_reads["tolist"] == 1 and sum(host_reads.values()) == 1, host_reads
    before = dict(host_reads)
    model.loss(ids, targets, check_ids=False).backward()
    assert host_reads == before, {k: host_reads[k] - before[k] for k in READS}

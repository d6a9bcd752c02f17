"""The lm-evaluation-harness adapter (model name ``mamba2``) on local task files and directories of every format.

Numbers are checked against direct computations with the model: loglikelihood of a continuation, rolling
loglikelihood of a whole text, greedy generation cut at a stop string; batching must not change any of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="pip install lm_eval (lm-evaluation-harness)")
from lm_eval.api.instance import Instance  # noqa: E402

from conftest import word_tokenizer  # noqa: E402
from mamba2 import Mamba2Config, Mamba2LM  # noqa: E402
from mamba2.generation import generate  # noqa: E402
from mamba2.interop import load, save_pretrained  # noqa: E402
from mamba2.lm_eval_adapter import Mamba2EvalLM, evaluate_tasks  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
WORDS = "the cat sat on mat dog ran to park one two three four five red green blue and are colours . ,".split()
DOCS = [
    {"question": "the cat sat on the", "choices": [" mat", " park", " red"], "label": 0,
     "text": "the cat sat on the mat . the dog ran to the park .", "answer": "mat"},
    {"question": "one two", "choices": [" three", " blue"], "label": 0, "text": "one two three four five .",
     "answer": "three"},
    {"question": "red green and", "choices": [" blue", " cat", " ,"], "label": 0,
     "text": "red green and blue are colours .", "answer": "blue"},
]
TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
               "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
    "tiny_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                "  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: ' {{answer}}'\n"
                "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
}


def tokenizer_file(path: Path) -> Path:
    return word_tokenizer(path, WORDS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The same random model (vocab = the 24-word tokenizer, padded to 32) in our, the official and the hf format."""
    from mamba2.tokenizer import HFTokenizer

    tmp = tmp_path_factory.mktemp("lm_eval")
    tok = HFTokenizer(tokenizer_file(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=tok.vocab_size, d_state=8, headdim=8,
                                  chunk_size=8)).eval()
    dirs = {fmt: save_pretrained(model, tmp / fmt, format=fmt, tokenizer=tok) for fmt in ("mamba2", "official", "hf")}
    (dirs["official"] / "tokenizer_spec.json").unlink()  # as released dirs: a bare tokenizer.json is enough
    tasks = tmp / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (tasks / f"{name}.yaml").write_text(head + body)
    return dirs, tasks


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _logprobs(model: Mamba2LM, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, over the real vocabulary."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, :, :model.config.vocab_size]
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("fmt", ["official", "hf"])
def test_adapter_numbers_match_the_model(model_dirs, fmt):
    dirs, _ = model_dirs
    loaded = load(dirs[fmt])
    model, tok = loaded.model, loaded.tokenizer
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]]
    lm1 = Mamba2EvalLM(pretrained=str(dirs[fmt]), batch_size="1")
    lm3 = Mamba2EvalLM(pretrained=str(dirs[fmt]), batch_size=3)
    got1 = lm1.loglikelihood([_req("loglikelihood", *p) for p in pairs])
    got3 = lm3.loglikelihood([_req("loglikelihood", *p) for p in pairs])
    for (ctx, cont), (s1, g1), (s3, g3) in zip(pairs, got1, got3):
        ids, n = tok.encode(ctx + cont), len(tok.encode(cont))
        lp = _logprobs(model, ids)[-n:]
        assert s1 == pytest.approx(float(lp.sum()), abs=1e-5) and s3 == pytest.approx(s1, abs=1e-5)
        assert g1 == g3
    texts = [d["text"] for d in DOCS]
    rolling = lm3.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    for text, got in zip(texts, rolling):
        assert got == pytest.approx(float(_logprobs(model, [tok.eos_token_id] + tok.encode(text)).sum()), abs=1e-4)
    short = Mamba2EvalLM(pretrained=str(dirs[fmt]), max_length=4).loglikelihood_rolling(
        [_req("loglikelihood_rolling", texts[0])])[0]
    assert short < 0 and short != pytest.approx(rolling[0], abs=1e-3)  # windows of 4 tokens: less context
    outs = lm3.generate_until([_req("generate_until", d["question"], {"until": ["."], "max_gen_toks": 5})
                               for d in DOCS])
    for d, out in zip(DOCS, outs):
        new = generate(model, [tok.encode(d["question"])], 5, temperature=0, eos_token_id=tok.eos_token_id)[0]
        ref = tok.decode([t for t in new if t != tok.eos_token_id]).split(".")[0]  # EOS ends the text too
        assert out == ref


@pytest.mark.parametrize("fmt", ["mamba2", "official"])
def test_simple_evaluate_on_local_tasks(model_dirs, fmt):
    """``lm_eval.simple_evaluate(model="mamba2", …)`` on three local JSON tasks: all three request types run."""
    dirs, tasks = model_dirs
    res = evaluate_tasks(str(dirs[fmt]), list(TASKS), include_path=str(tasks), include_defaults=False,
                         batch_size=4)["results"]
    lm = Mamba2EvalLM(pretrained=str(dirs[fmt]))
    acc = sum(max(range(len(d["choices"])), key=lambda i: lm.loglikelihood(
        [_req("loglikelihood", d["question"], d["choices"][i])])[0][0]) == d["label"] for d in DOCS) / len(DOCS)
    assert res["tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert res["tiny_ppl"]["word_perplexity,none"] > 1 and res["tiny_ppl"]["bits_per_byte,none"] > 0
    assert 0 <= res["tiny_gen"]["exact_match,none"] <= 1


def test_registered_under_mamba2():
    from lm_eval.api.registry import get_model

    assert get_model("mamba2") is Mamba2EvalLM


def test_cuda_request_falls_back_to_cpu(model_dirs):
    """lm_eval's CLI passes device='cuda' by default; without CUDA the adapter runs on the CPU."""
    dirs, _ = model_dirs
    lm = Mamba2EvalLM(pretrained=str(dirs["hf"]), device="cuda")
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_eval_tasks(model_dirs, capsys, monkeypatch):
    """``mamba2 eval --tasks`` runs local lm-eval tasks on a checkpoint and prints one line per task."""
    from mamba2.cli import main

    dirs, tasks = model_dirs
    assert main(["eval", "--checkpoint", str(dirs["mamba2"]), "--tasks", "tiny_mc,tiny_ppl",
                 "--include-path", str(tasks), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tiny_mc: acc" in out and "tiny_ppl:" in out and "bits_per_byte" in out
    import mamba2.lm_eval_adapter as adapter         # --dtype reaches the model lm-eval loads

    seen = []
    real = adapter.load
    monkeypatch.setattr(adapter, "load", lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    assert main(["eval", "--checkpoint", str(dirs["mamba2"]), "--tasks", "tiny_mc", "--include-path", str(tasks),
                 "--device", "cpu", "--dtype", "bfloat16", "--limit", "2"]) == 0
    assert seen == [torch.bfloat16] and "tiny_mc: acc" in capsys.readouterr().out

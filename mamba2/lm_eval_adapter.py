"""lm-evaluation-harness adapter: evaluate any mamba2-loadable directory with ``lm_eval``, as model ``mamba2``.

    python -m mamba2.lm_eval_adapter run --model mamba2 --model_args pretrained=DIR --tasks TASK …

(the stock ``lm_eval`` command only knows this model once this module is imported, which ``-m`` does; from
Python, ``import mamba2.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="mamba2", …)``, or
:func:`evaluate_tasks`). The directory may be in our, the official or the transformers format; its own
tokenizer is used. Log-probabilities are over the real vocabulary (padded rows excluded); continuations are
scored in right-padded batches, which a causal model allows without masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval import utils as _lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
except ImportError as e:  # pragma: no cover - exercised only without lm_eval
    raise ImportError("mamba2.lm_eval_adapter needs lm-evaluation-harness: pip install lm_eval") from e

from mamba2.errors import UserError
from mamba2.interop.loading import load
from mamba2.serving import Engine, SamplingParams


class Mamba2EvalLM(TemplateLM):
    """``lm_eval`` LM over a :class:`mamba2.Mamba2LM`.

    Args (``--model_args`` strings are converted):
        pretrained: model directory (any supported format), or pass ``model`` and ``tokenizer`` objects.
        batch_size: rows per forward (``"auto"`` means 8). max_length: longest context, in tokens, kept from
            the right (default 2048; rolling log-likelihood windows have this length).
        device, dtype: where and in which dtype to run (default cpu, float32; cuda falls back to cpu when absent).
    Raises:
        UserError: no tokenizer (neither in the directory nor given).
    """

    def __init__(self, pretrained: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, max_length: int | str = 2048,
                 device: str | None = None, dtype: str = "float32", **_: Any):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm_eval's CLI asks for cuda by default
        dev = torch.device(device)
        if model is None:
            if pretrained is None:
                raise UserError("mamba2 lm_eval model: give pretrained=DIR")
            loaded = load(pretrained, dtype=getattr(torch, str(dtype)), device=dev, tokenizer=tokenizer)
            model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None:
            raise UserError(f"mamba2 lm_eval model: {pretrained or 'the model'} has no tokenizer "
                            f"(put a tokenizer.json in the directory)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = dev
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length)
        self._engine: Engine | None = None
        self.vocab_size = model.config.vocab_size

    # ----------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        """The tokenizer's end-of-text token, or 0 when it has none (byte tokenizers)."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return 0 if eos is None else int(eos)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw: Any) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: list[int], **kw: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    # ----------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw: Any) -> list[tuple[float, bool]]:
        """requests: ``(cache_key, context_ids, continuation_ids)``; returns ``(sum log p, is_greedy)`` each."""
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            inp = (list(ctx) + list(cont))[-(self.max_length + 1):-1]
            rows.append((i, inp, min(len(cont), len(inp))))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        rows.sort(key=lambda r: -len(r[1]))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = len(batch[0][1])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for j, (_, inp, _) in enumerate(batch):
                ids[j, :len(inp)] = torch.tensor(inp)
            logp = F.log_softmax(self.model(ids.to(self._device))[..., :self.vocab_size].float(), dim=-1)
            for j, (i, inp, n) in enumerate(batch):
                target = torch.tensor(list(requests[i][2])[-n:], device=logp.device)
                lp = logp[j, len(inp) - n:len(inp)]
                score = float(lp.gather(-1, target[:, None]).sum())
                results[i] = (score, bool((lp.argmax(-1) == target).all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of token log-probabilities of each whole string, in windows of ``max_length`` tokens."""
        out = []
        for req in requests:
            (string,) = req.args
            windows = [(None, *_lm_utils.make_disjoint_window(w)) for w in _lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(s for s, _ in self._loglikelihood_tokens(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ----------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled with ``do_sample``/``temperature``) continuation, cut at the first ``until`` string.

        gen_kwargs: ``until`` (str or list; the EOS text is added), ``max_gen_toks`` (default 256),
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``.
        """
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            text = self._generate(self.tok_encode(context)[-self.max_length:] or [self.prefix_token_id], max_new,
                                  until, temperature, kw.get("top_k"), kw.get("top_p"))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, prompt: list[int], max_new: int, until: list[str], temperature: float,
                  top_k: int | None, top_p: float | None) -> str:
        if self._engine is None or self._engine.max_len < self.max_length + max_new:
            self._engine = Engine(self.model, max_batch=1, max_len=self.max_length + max_new,
                                  vocab_size=self.vocab_size)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        params = SamplingParams(max_tokens=max_new, temperature=temperature, top_k=top_k or 0,
                                top_p=1.0 if top_p is None else top_p, seed=0,
                                stop_token_ids=() if eos is None else (eos,))
        rid = self._engine.add_request(prompt, params, stream=bool(until))
        new: list[int] = []
        while self._engine.has_work():
            for out in self._engine.step():
                new.extend(out.new_tokens)
            if until and any(s and s in self.tok_decode(new) for s in until):
                self._engine.abort(rid)
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        text = self.tok_decode(new)
        for s in until:
            if s:
                text = text.split(s)[0]
        return text


# a lazy, module-qualified target: registering it again (e.g. under ``python -m``) is a no-op, not a clash
model_registry.register("mamba2", target="mamba2.lm_eval_adapter:Mamba2EvalLM")


def evaluate_tasks(pretrained: str, tasks: list[str], *, include_path: str | None = None,
                   include_defaults: bool = True, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
                   max_length: int = 2048) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on ``tasks`` (names, or names defined by YAML files under ``include_path``).

    ``include_defaults=False`` skips indexing the harness's thousands of built-in task files (much faster when
    only local tasks are used). Returns lm_eval's results dict (``results[task][metric]``).
    Raises UserError for unknown tasks.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path, include_defaults=include_defaults)
    try:
        return lm_eval.simple_evaluate(model="mamba2", model_args=dict(pretrained=pretrained, max_length=max_length,
                                                                       dtype=dtype),
                                       tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                                       batch_size=batch_size, device=device)
    except KeyError as e:
        raise UserError(f"lm_eval: unknown task {e}") from None


if __name__ == "__main__":  # python -m mamba2.lm_eval_adapter run --model mamba2 …
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

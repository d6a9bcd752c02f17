"""Training loop: AdamW, warmup + cosine schedule, clipping, accumulation, evaluation, checkpoints, resume.

A run is reproducible step by step: batch k comes from (seed, k) (see :class:`~mamba2.data.PackedLoader`), the
learning rate from the step number, and a checkpoint stores the optimizer and RNG states, so training N steps,
saving, loading and training N more gives the same losses as training 2N steps in one go. That holds for a run
stopped by Ctrl-C too: :meth:`Trainer.fit` lets a step in progress finish before it saves. A run resumed with
another ``steps`` keeps its current learning rate and decays from there to the new end (see :func:`lr_at`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mamba2 import checkpoints, fsutil
from mamba2.data import IGNORE_INDEX, STDLIB, PackedLoader, TokenStream
from mamba2.devices import default_device
from mamba2.distributed import checkpoint as dist_checkpoint
from mamba2.errors import UserError, interrupt_for, recording_interrupt
from mamba2.evaluation import EvalResult, autocast_to, evaluate
from mamba2.metrics import METRICS_FILE, MetricsLog
from mamba2.plots import plot_loss_curve
from mamba2.train_config import TrainConfig

LOSS_CURVE_FILE = "loss_curve.png"
BEST_DIR = "best"
SHARDED_DIR = "distributed"
"""Subdirectory of a checkpoint written by a distributed run: model and optimizer through
``torch.distributed.checkpoint`` (:mod:`mamba2.distributed.checkpoint`), readable at any world size."""


def lr_at(step: int, cfg: TrainConfig, anchor: tuple[int, float] | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, cosine to ``lr*min_lr_ratio``
    at step ``steps``.

    ``anchor = (step0, ratio0)`` describes a run whose end moved at step ``step0`` (see :class:`Trainer`): from
    ``step0`` on the rate follows a cosine from ``lr*ratio0`` (the rate it had reached) to the floor at ``steps``.
    """
    if anchor is not None and step >= anchor[0]:
        start, top = anchor
    elif step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    else:
        start, top = cfg.warmup, 1.0
    t = min((step - start) / max(cfg.steps - start, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (top - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss``) of a duration in seconds."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)   # files of a checkpoint are replaced, never changed in place: sharing them is safe
    except OSError:
        shutil.copy2(src, dst)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on the model's ``no_decay_param_names()`` (A_log, dt_bias, D, norms, biases),
    on embeddings, or on any parameter with fewer than 2 dims; decay on the rest (a tied head counts once)."""
    no_decay = set(model.no_decay_param_names()) if hasattr(model, "no_decay_param_names") else set()
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if name in no_decay or "embedding" in name or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``cfg.dtype`` on ``device`` (``auto``: bfloat16 on CUDA, float32 elsewhere)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


class _DeferredSigint:
    """While entered, Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt at once, as usual, except inside
    :meth:`hold`, where they are held back and raised when the block ends, so that a training step is never cut in
    half.

    With ``agree`` (a distributed run: ``agree(flag)`` says whether any rank's flag is set) a signal is held back
    wherever it lands — evaluation and saving are collective too, and a rank that left them alone would leave the
    others waiting — and :meth:`check` raises on every rank together, after the same step.

    Only takes over the default handlers (:func:`~mamba2.errors.recording_interrupt` counts as one), and only
    from the main thread (where Python runs signal handlers): an ignored signal stays ignored and a handler of the
    caller's stays in place.
    """

    def __init__(self, agree: Callable[[bool], bool] | None = None):
        self.agree = agree
        self._installed: dict[int, Any] = {}
        self._holding, self._pending = agree is not None, 0       # the signal received and held back, if any

    def __enter__(self) -> _DeferredSigint:
        if threading.current_thread() is threading.main_thread():
            for sig, defaults in ((signal.SIGINT, (signal.default_int_handler, recording_interrupt)),
                                  (signal.SIGTERM, (signal.SIG_DFL, recording_interrupt))):
                current = signal.getsignal(sig)
                if current in defaults:
                    signal.signal(sig, self._handle)
                    self._installed[sig] = current
        return self

    def __exit__(self, *exc) -> None:
        for sig, default in self._installed.items():
            signal.signal(sig, default)

    def _handle(self, signum, frame) -> None:
        if not self._holding:
            raise interrupt_for(signum)
        self._pending = signum

    @contextlib.contextmanager
    def hold(self):
        """Hold signals back during the block (one process: raise KeyboardInterrupt at its end if one came)."""
        was, self._holding = self._holding, True
        try:
            yield
        finally:
            self._holding = was
        if self.agree is None and self._pending:
            raise interrupt_for(self._pending)

    def check(self) -> None:
        """Distributed: raise KeyboardInterrupt on every rank if any rank received a signal (one all-reduce);
        :class:`mamba2.errors.Terminated` on a rank that received SIGTERM."""
        if self.agree is not None and self.agree(bool(self._pending)):
            raise interrupt_for(self._pending)


class Trainer:
    """Trains ``model`` on packed rows of ``train`` and evaluates on ``val``.

    Args:
        model, model_config, tokenizer: what is trained and saved with each checkpoint.
        train, val: token streams (``val`` may be None: no evaluation).
        cfg: :class:`TrainConfig`.
        out_dir: checkpoint directory (None: never save).
        state: a trainer-state dict from :func:`mamba2.checkpoints.load` to resume from. If its ``steps`` differs
            from ``cfg.steps`` past the warmup, the learning rate goes on from the rate reached and decays by cosine
            to the new end (no jump, no second warmup); with the same ``steps`` the run continues exactly.
        corpus: the corpus name stored with checkpoints (so ``--resume`` and ``eval`` can find it again).
        progress: show a tqdm bar (None: only on a terminal). Without the bar (nohup, CI, ``| tee``) a line with
            the running train loss, tokens/s, elapsed time and ETA is logged every ``report_every_s`` seconds
            (0: every step).
        log: where one-line messages go (default: ``tqdm.write``).
        tensorboard: a directory to log the metrics to TensorBoard as well (see :class:`~mamba2.metrics.MetricsLog`).
        options: the caller's own choices for after training (the CLI's export formats and sample), kept as they
            are in the trainer state under ``"options"`` so that a resumed run repeats them.
        parallel: a :class:`mamba2.distributed.runtime.Parallel` to train on its mesh (``torchrun``): the model is
            parallelized (TP, CP, FSDP2), each rank reads its share of every global batch (the losses are those of
            the one-process run with the same batch), rank 0 logs and writes; checkpoints add a
            ``distributed/`` directory of sharded model and optimizer state that resumes at any world size.

    With ``cfg.lora_rank`` > 0 the model gets LoRA adapters (:mod:`mamba2.lora`) and only they train; each checkpoint
    holds the merged weights and, in its trainer state, the adapter (a resume takes it back out of the weights).

    With ``cfg.keep_best``, ``cfg.eval_every`` > 0 and an ``out_dir``, every evaluation with the lowest held-out
    loss so far also saves the model (with the trainer state, no optimizer) to ``out_dir/best``; the step and loss
    of that evaluation are kept in the trainer state, so a resumed run only replaces it with a better one.

    Raises:
        UserError: token ids outside the model's vocabulary, a training split shorter than one row, bad cfg.
    """

    def __init__(self, model: torch.nn.Module, model_config, tokenizer, train: TokenStream,
                 val: TokenStream | None, cfg: TrainConfig, *, out_dir: str | Path | None = None,
                 device: str | torch.device | None = None, state: dict[str, Any] | None = None,
                 corpus: str = STDLIB, progress: bool | None = None, log: Callable[[str], None] | None = None,
                 report_every_s: float = 30.0, parallel=None, tensorboard: str | Path | None = None,
                 options: dict[str, Any] | None = None):
        cfg.validate()
        for stream in (train, val):
            if stream is not None:
                stream.check_vocab(model_config.vocab_size)
        self.cfg, self.model_config, self.tokenizer, self.val, self.corpus = cfg, model_config, tokenizer, val, corpus
        self.options = dict(options or {})
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.parallel, self.main = parallel, parallel is None or parallel.main
        if parallel is not None:
            device = parallel.device
            parallel.dims.check_batch(cfg.batch_size, cfg.seq_len, model_config.d_conv)
        self.device = torch.device(device) if device is not None else default_device()
        self.amp = compute_dtype(cfg, self.device)
        if self.amp == torch.float16 and parallel is not None:
            raise UserError("--dtype float16 (loss scaling) runs in one process; use bfloat16 with torchrun")
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        if cfg.lora_rank:
            if parallel is not None:
                raise UserError("--lora-rank trains in one process; leave out torchrun (or train every weight)")
            if state is not None and "adapter" not in state:
                raise UserError("--lora-rank cannot be added when resuming: the run saved every weight")
            from mamba2 import lora
            model = lora.attach(model.to(self.device), **lora.settings(cfg),
                                adapter=None if state is None else state["adapter"])
        self.model = model.to(self.device).train()
        self.loader = PackedLoader(train, cfg.batch_size, cfg.seq_len, cfg.seed)
        portable = None
        if parallel is not None:
            if state is not None and "optimizer" in state:     # a one-process checkpoint: its optimizer by name
                plain = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
                plain.load_state_dict(state["optimizer"])
                portable = dist_checkpoint.portable_state(self.model, plain if plain.state else None)
                state = {k: v for k, v in state.items() if k != "optimizer"}
            self.model = parallel.parallelize(self.model, None if self.amp == torch.float32 else self.amp)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        if portable is not None:
            dist_checkpoint.load_portable(self.model, self.optimizer, portable)
        elif (state is not None and "optimizer" not in state and self.out_dir is not None
              and (self.out_dir / SHARDED_DIR).is_dir()):
            dist_checkpoint.load_sharded(self.out_dir / SHARDED_DIR, self.model, self.optimizer)
        if not self.main:
            progress, log = False, (lambda msg: None)
        self.progress, self.log, self.report_every_s = progress, log or tqdm.write, report_every_s
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # batches consumed: the data position
        self.elapsed_s = 0.0
        self.train_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float, float, float]] = []  # step, loss, perplexity, bits/byte
        self.lr_anchor: tuple[int, float] | None = None  # see lr_at
        self.best: tuple[int, float] | None = None  # step and held-out loss of the weights in out_dir/best
        self.eval_from = 0       # the first evaluation on this corpus's held-out set (one resumed on another: later)
        self._saved_step = -1
        self.lr = self.grad_norm = math.nan   # of the last step
        if state is not None:
            self.load_state(state)
        self.metrics = MetricsLog(self.out_dir if self.main else None,
                                  resume_step=self.step if state is not None else None,
                                  tensorboard=tensorboard if self.main else None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights and the optimizer needed to continue this run exactly."""
        state = {
            "step": self.step, "micro_step": self.micro_step, "elapsed_s": self.elapsed_s,
            "train_config": self.cfg.to_dict(), "corpus": self.corpus,
            "train_history": [list(x) for x in self.train_history],
            "eval_history": [list(x) for x in self.eval_history],
            "lr_anchor": list(self.lr_anchor) if self.lr_anchor else None,
            "best": list(self.best) if self.best else None, "eval_from": self.eval_from,
            "rng_torch": torch.get_rng_state(),
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if self.cfg.lora_rank:
            from mamba2 import lora
            state["adapter"] = lora.adapter_state(self.model)
        if self.options:
            state["options"] = self.options
        if self.metrics.tensorboard is not None:
            state["tensorboard"] = str(self.metrics.tensorboard)
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.train_history = [(int(s), float(v)) for s, v in state.get("train_history", [])]
        self.eval_history = [(int(s), *map(float, rest)) for s, *rest in state.get("eval_history", [])]
        self.best = (int(state["best"][0]), float(state["best"][1])) if state.get("best") else None
        other_corpus = state.get("corpus", self.corpus) != self.corpus      # another held-out set from here on
        self.eval_from = len(self.eval_history) if other_corpus else int(state.get("eval_from", 0))
        if self.best is not None and other_corpus:
            # its loss is not comparable with this corpus's: any evaluation on the new set replaces it
            self.log(f"the held-out set changed with the corpus ({state['corpus']} -> {self.corpus}): "
                     f"{self.out_dir / BEST_DIR if self.out_dir is not None else 'the best model'} (loss "
                     f"{self.best[1]:.3f} at step {self.best[0]}, on the other set) stays until an evaluation on this "
                     "corpus replaces it")
            self.best = (self.best[0], math.inf)
        anchor = (int(state["lr_anchor"][0]), float(state["lr_anchor"][1])) if state.get("lr_anchor") else None
        saved = TrainConfig.from_dict(state["train_config"]) if "train_config" in state else self.cfg
        if saved.steps != self.cfg.steps and self.step > saved.warmup:
            anchor = (self.step, lr_at(self.step, saved, anchor) / saved.lr)
        self.lr_anchor = anchor
        if "rng_torch" in state:
            torch.set_rng_state(state["rng_torch"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self._saved_step = self.step

    def save(self) -> Path | None:
        """Write a checkpoint (with the loss curve, and this run's ``best/`` carried over) to ``out_dir``
        atomically; no-op without ``out_dir``. Distributed: every rank calls it (see :meth:`_save_distributed`)."""
        if self.out_dir is None:
            return None
        if self.parallel is not None:
            return self._save_distributed()
        model = self.plain_model()
        extra = self._extra_files(model)
        if self.cfg.save_adapter:
            from mamba2 import lora
            extra[lora.ADAPTER_DIR] = lambda p: lora.save_adapter(self.model, p)
        self._write(self.out_dir, model, self.optimizer, extra)
        self.metrics.saved()
        self._saved_step = self.step
        return self.out_dir

    def _extra_files(self, model: torch.nn.Module) -> dict[str, Callable[[Path], None]]:
        train, val = list(self.train_history), [(s, loss) for s, loss, *_ in self.eval_history]
        title = f"{model.num_parameters():,} parameters, step {self.step}"
        extra = {LOSS_CURVE_FILE: lambda p: plot_loss_curve(train, val, p, title), METRICS_FILE: self.metrics.write_to}
        best = self.out_dir / BEST_DIR
        fsutil.recover(best, checkpoints.is_checkpoint)
        if self.best is not None and best.is_dir():   # one of another run (--overwrite) is dropped
            extra[BEST_DIR] = lambda p: shutil.copytree(best, p, copy_function=_link_or_copy)
        return extra

    def _write(self, directory: Path, model: torch.nn.Module, optimizer, extra=None) -> None:
        checkpoints.save(directory, model, self.model_config, self.tokenizer, optimizer, self.state_dict(),
                         extra_files=extra)

    def _save_distributed(self) -> Path:
        """Rank 0 writes the one-device model files (gathered) and the trainer state; all ranks write their shards
        of model and optimizer into ``distributed/`` of the same temporary directory, swapped in whole."""
        plain = self.plain_model()
        if self.main:
            def write_shards(path: Path) -> None:
                self.parallel.broadcast(str(path))
                dist_checkpoint.save_sharded(path, self.model, self.optimizer)

            extra = {**self._extra_files(plain), SHARDED_DIR: write_shards}
            try:
                self._write(self.out_dir, plain, None, extra)
            finally:
                self.parallel.broadcast(None)    # unblocks the other ranks if the write failed before the shards
            self.metrics.saved()
        else:
            path = self.parallel.broadcast()
            if path is None:
                raise RuntimeError("rank 0 failed to write the checkpoint (its error says why)")
            dist_checkpoint.save_sharded(path, self.model, self.optimizer)
            self.parallel.broadcast()
        self._saved_step = self.step
        return self.out_dir

    def plain_model(self) -> torch.nn.Module | None:
        """The model with the current weights as one plain :class:`~mamba2.models.Mamba2LM`: adapters merged in,
        or (distributed, collective) gathered onto rank 0 (None on the other ranks); the trained model otherwise."""
        from mamba2.models import Mamba2LM

        if self.parallel is not None:
            full = dist_checkpoint.full_model_state(self.model)
            return Mamba2LM.from_state_dict(self.model_config, full) if self.main else None
        if self.cfg.lora_rank:
            from mamba2 import lora
            return Mamba2LM.from_state_dict(self.model_config, lora.merged_state_dict(self.model))
        return self.model

    def _save_best(self) -> None:
        exists = checkpoints.is_checkpoint(self.out_dir)
        if self.parallel is not None:
            exists = self.parallel.broadcast(exists)
        if not exists:
            self.save()   # best/ lives inside the checkpoint directory, which must exist first
        model = self.plain_model()
        if self.main:
            self._write(self.out_dir / BEST_DIR, model, None)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` batches; returns their mean loss (nats per token).

        The step counters move only once the weights are updated: a step that raises leaves the trainer (weights,
        optimizer, data position) where it was, at the end of the last good step.

        Raises:
            UserError: the loss or the gradient norm is not finite (diverged: a lower learning rate usually helps).
        """
        cfg, dev = self.cfg, self.device
        lr = lr_at(self.step, cfg, self.lr_anchor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        par = self.parallel
        for k in range(cfg.grad_accum):
            batch = self.loader.batch(self.micro_step + k)
            if par is not None:
                n_targets = int((batch.targets != IGNORE_INDEX).sum())
                batch = par.local_batch(batch)
            batch = batch.to(dev)
            with autocast_to(dev, self.amp):
                # the streams' ids were checked against the vocabulary once, in __init__
                if par is None:
                    loss = self.model.loss(batch.input_ids, batch.targets, seq_idx=batch.seq_idx, check_ids=False)
                else:
                    loss = par.loss(self.model, batch, n_targets)
            scaled = loss / cfg.grad_accum
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            total += float(loss.detach())
        loss = total / cfg.grad_accum
        if par is not None:     # each rank holds its share, scaled by the number of ranks that share the batch
            loss = par.sum(loss) / (par.dims.dp * par.dims.cp)
        # a finite loss can still have inf/NaN gradients, which would turn every weight into NaN; max_norm=inf
        # only measures the norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if par is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf))
        else:
            grad_norm = par.clip_grad_norm(self.model, cfg.grad_clip or math.inf)
        # float16: an overflowing gradient is the loss scaler's business (it skips the step and lowers the scale)
        checks = [("loss", loss)] + ([("gradient norm", grad_norm)] if self.scaler is None else [])
        for what, value in checks:
            if not math.isfinite(value):
                hint = " or --dtype bfloat16 (float16 overflows above 65,504)" if self.amp == torch.float16 else ""
                raise UserError(f"training diverged: {what} is {value} at step {self.step + 1}; try a lower "
                                f"--lr{hint}")
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        self.micro_step += cfg.grad_accum
        self.train_history.append((self.step, loss))
        self.lr, self.grad_norm = lr, grad_norm
        return loss

    def evaluate(self) -> EvalResult | None:
        """Held-out loss on up to ``cfg.eval_tokens`` tokens of ``val``; recorded in the history and logged, and
        the model saved to ``out_dir/best`` if it is the best so far (see the class docstring)."""
        if self.val is None:
            return None
        cfg = self.cfg
        if self.parallel is None:
            r = evaluate(self.model, self.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         max_tokens=cfg.eval_tokens, device=self.device, autocast=self.amp)
        else:
            r = self.parallel.evaluate(self.model, self.val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                       max_tokens=cfg.eval_tokens, autocast=self.amp)
        self.eval_history.append((self.step, r.loss, r.perplexity, r.bits_per_byte))
        self._saved_step = -1      # the trainer state changed (history, best): the end of fit saves it
        self.metrics.add(step=self.step, eval_loss=r.loss, perplexity=r.perplexity, bits_per_byte=r.bits_per_byte,
                         eval_tokens=r.tokens)
        note = ""
        if (cfg.keep_best and cfg.eval_every and self.out_dir is not None
                and (self.best is None or r.loss < self.best[1])):
            self.best = (self.step, r.loss)
            self._save_best()
            note = f" (best so far: saved to {self.out_dir / BEST_DIR})"
        self.log(f"step {self.step:>6}: held-out {r}{note}")
        return r

    def fit(self, until_step: int | None = None) -> EvalResult | None:
        """Train to ``until_step`` (default ``cfg.steps``) or for ``max_minutes`` (counted from this call);
        evaluate and save at the end.

        Returns the last held-out result (None without ``val``). On Ctrl-C or SIGTERM, saves and raises
        KeyboardInterrupt; one during a training step takes effect when the step is done, so resuming the checkpoint
        continues exactly this run. Distributed: wherever the signal lands on whichever rank, every rank stops after
        the same step and saves together.

        Raises:
            UserError: training diverged (see :meth:`train_step`); the checkpoint saved last is left as it is.
        """
        cfg = self.cfg
        until = cfg.steps if until_step is None else min(until_step, cfg.steps)
        start = time.perf_counter()
        elapsed0, train_s = self.elapsed_s, 0.0
        last = None
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        bar = None
        first_step, ema, reported = self.step, 0.0, 0.0
        # distributed: every rank must stop after the same step, whichever got the signal or saw the time run out
        agree = None if self.parallel is None else self.parallel.any
        try:
            with _DeferredSigint(agree) as sigint:
                if self.step == 0 and not self.eval_history:
                    last = self.evaluate()
                    sigint.check()
                bar = tqdm(total=until, initial=self.step, unit="step", dynamic_ncols=True,
                           disable=None if self.progress is None else not self.progress)
                while self.step < until:
                    t0 = time.perf_counter()
                    with sigint.hold():      # a step and its bookkeeping (the saved step keeps its metrics line)
                        loss = self.train_step()
                        train_s += time.perf_counter() - t0
                        now = time.perf_counter() - start
                        self.elapsed_s = elapsed0 + now
                        tok_s = (self.step - first_step) * tokens_per_step / train_s
                        self.metrics.add(step=self.step, train_loss=loss, lr=self.lr, grad_norm=self.grad_norm,
                                         tokens_per_s=tok_s, elapsed_s=round(self.elapsed_s, 3))
                    ema = 0.9 * ema + 0.1 * loss
                    smooth = ema / (1 - 0.9 ** (self.step - first_step))  # bias-corrected running mean
                    bar.update(1)
                    bar.set_postfix(loss=f"{smooth:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    if bar.disable and now - reported >= self.report_every_s:
                        reported = now
                        eta = (until - self.step) * train_s / (self.step - first_step)
                        self.log(f"step {self.step:>6}/{until}: train loss {smooth:.4f} | {tok_s:,.0f} tokens/s | "
                                 f"elapsed {_clock(self.elapsed_s)} | ETA {_clock(eta)}")
                    time_up = cfg.max_minutes is not None and now >= 60 * cfg.max_minutes
                    if agree is not None and cfg.max_minutes is not None:
                        time_up = agree(time_up)
                    if time_up:
                        self.log(f"stopping at step {self.step}: the {cfg.max_minutes:g}-minute budget is spent")
                        break
                    if self.step < until and cfg.eval_every and self.step % cfg.eval_every == 0:
                        last = self.evaluate()
                    if self.step < until and cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                    sigint.check()
            bar.close()
            if not self.eval_history or self.eval_history[-1][0] != self.step:
                last = self.evaluate()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            self.elapsed_s = elapsed0 + time.perf_counter() - start
            self._save_through_ctrl_c()
            raise
        finally:
            self.metrics.close()
        self._save_through_ctrl_c()
        return last

    def _save_through_ctrl_c(self) -> None:
        """Save unless this step is saved already, holding back a Ctrl-C until the save is complete (a second
        Ctrl-C while the first one's save ran left the previous checkpoint and a message saying otherwise)."""
        if self.step != self._saved_step:
            agree = None if self.parallel is None else self.parallel.any
            with _DeferredSigint(agree) as sigint:
                with sigint.hold():
                    self.save()
                sigint.check()

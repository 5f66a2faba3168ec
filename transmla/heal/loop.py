"""The healing optimisation loop (micro-batches, accumulation, logging, evaluation, checkpoints) and the
validation NLL, both split across processes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import TrainState, checkpoint_path, mark_complete
from .data import Windows, WindowStream
from .loss import distillation_loss, hidden_distillation_loss

if TYPE_CHECKING:
    from .options import HealOptions


@torch.no_grad()
def mean_nll(model: Any, windows: torch.LongTensor, batch_size: int, accelerator: Any) -> float:
    """Mean next-token NLL over the windows, split across processes (every process runs the same number of batches)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(windows), world))
    per_process = math.ceil(len(windows) / world)
    weights = [1.0] * len(mine) + [0.0] * (per_process - len(mine))
    mine += [0] * (per_process - len(mine))
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, per_process, batch_size):
            batch = windows[mine[start : start + batch_size]].to(accelerator.device)
            weight = torch.tensor(weights[start : start + batch_size], dtype=torch.float64, device=accelerator.device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none"
            ).view(len(batch), -1).double().sum(1)
            totals[0] += (nll * weight).sum()
            totals[1] += weight.sum() * (batch.shape[1] - 1)
    finally:
        model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return (totals[0] / totals[1]).item()


def hidden_paths(*models: Any) -> tuple[tuple[Any, Any], ...] | None:
    """(decoder, output head) of each causal LM, or None where one has no such split or changes its logits after
    the head (e.g. final soft-capping)."""
    paths = []
    for model in models:
        body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        config = model.config.get_text_config()
        if body is None or head is None or getattr(config, "final_logit_softcapping", None):
            return None
        paths.append((body, head))
    return tuple(paths)


class TrainingLoop:
    """The optimisation loop: micro-batches, accumulation, logging, evaluation and checkpoints."""

    def __init__(self, accelerator: Any, student: Any, teacher: Any, optimizer: Any, scheduler: Any, state: TrainState,
                 windows: Windows, options: HealOptions, work: Path, total_steps: int, tokens_per_step: int,
                 on_step: Callable[[int, dict[str, float]], None] | None) -> None:
        self.acc, self.student, self.teacher = accelerator, student, teacher
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state
        self.windows, self.options, self.work = windows, options, work
        self.total_steps, self.tokens_per_step, self.on_step = total_steps, tokens_per_step, on_step
        self.stream = WindowStream(windows.train, options.batch_size, options.seed, accelerator.process_index, accelerator.num_processes)
        self.saved_step = state.step
        # One process and the KL alone: the KL from both models' final hidden states, a chunk of tokens at a time.
        # (Several processes call the wrapped student as a whole, so that its gradients are synchronised.)
        self.heads = None
        if accelerator.num_processes == 1 and not options.ce_weight:
            self.heads = hidden_paths(accelerator.unwrap_model(student), teacher)

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation loss of one micro-batch (its parts detached)."""
        opt = self.options
        if self.heads is not None:
            (student_body, student_head), (teacher_body, teacher_head) = self.heads
            with torch.no_grad():
                teacher_hidden = teacher_body(input_ids=batch, use_cache=False).last_hidden_state
            with self.acc.autocast():
                hidden = student_body(input_ids=batch, use_cache=False).last_hidden_state
                kl, parts = hidden_distillation_loss(hidden, student_head, teacher_hidden, teacher_head, opt.temperature)
                return opt.kl_weight * kl, parts
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
        logits = self.student(input_ids=batch, use_cache=False).logits
        return distillation_loss(logits, teacher_logits, batch, opt.temperature, opt.kl_weight, opt.ce_weight)

    def train(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="healing", unit="step",
                   disable=not (progress and self.acc.is_local_main_process))
        try:
            while self.state.step < self.total_steps:
                began = time.perf_counter()
                record = self.step()
                self.state.seconds += time.perf_counter() - began
                record["tokens_per_s"] = self.tokens_per_step / max(time.perf_counter() - began, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                self.after_step(record)
        except KeyboardInterrupt:
            if self.acc.num_processes == 1 and self.state.step > self.saved_step:
                self.save_checkpoint()
            bar.close()
            self.acc.print(f"interrupted at step {self.state.step}; continue with --resume (checkpoints in {self.work})")
            raise
        bar.close()

    def step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches."""
        opt = self.options
        device = self.acc.device
        sums = torch.zeros(3, device=device)
        micro = self.state.step * opt.grad_accum
        for i in range(opt.grad_accum):
            batch = self.stream.batch(micro + i).to(device)
            with self.acc.accumulate(self.student):
                loss, parts = self.outputs(batch)
                self.acc.backward(loss)
                if self.acc.sync_gradients:
                    if opt.max_grad_norm:
                        self.acc.clip_grad_norm_(self.student.parameters(), opt.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.step += 1
                    self.state.tokens += self.tokens_per_step
            sums += torch.stack([loss.detach().float(), parts["kl"], parts.get("ce", torch.zeros((), device=device))])
        means = self.acc.reduce(sums / opt.grad_accum, reduction="mean").tolist()
        record = {"step": self.state.step, "tokens": self.state.tokens, "loss": means[0], "kl": means[1],
                  "lr": self.scheduler.get_last_lr()[0]}
        if opt.ce_weight:
            record["ce"] = means[2]
        return record

    def after_step(self, record: dict[str, float]) -> None:
        opt, step = self.options, self.state.step
        if opt.eval_every and step % opt.eval_every == 0 and step < self.total_steps:
            nll = mean_nll(self.student, self.windows.validation, opt.batch_size, self.acc)
            self.state.evals.append({"step": step, "tokens": self.state.tokens, "perplexity": math.exp(nll)})
            record["val_perplexity"] = math.exp(nll)
        self.state.history.append(record)
        if opt.checkpoint_every and step % opt.checkpoint_every == 0 and step < self.total_steps:
            self.save_checkpoint()
        if self.on_step is not None:
            self.on_step(step, record)

    def save_checkpoint(self) -> None:
        path = checkpoint_path(self.work, self.state.step)
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            mark_complete(path, self.options.keep_checkpoints)
        self.acc.wait_for_everyone()
        self.saved_step = self.state.step

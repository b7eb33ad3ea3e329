"""The epoch loop: train a ``TrainingGraph`` on a ``DataModule``, validate, checkpoint every epoch.

Plain PyTorch, no tracking: the caller gets per-epoch metrics through ``on_epoch_end`` and decides where
they go. The step itself never waits on the device: per-step statistics are summed into device tensors
and read once per epoch; the divergence guard reads its small record every ``check_every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin
import torch
from tqdm.auto import tqdm

from components import distributed as dist
from components.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from components.eval.attacks import robust_accuracy
from components.graph import TrainingGraph
from components.guard import DivergenceGuard, TrainingDivergedError
from components.optim import sgd
from components.schedules import PaperStepSchedule, Schedule, make_lr_scheduler

EpochCallback = Callable[[int, dict[str, float], dict[str, Path]], None]


class TrainingInterruptedError(Exception):
    """Raised between steps when a stop was requested (SIGTERM); the last epoch's checkpoint stands."""


@dataclass
class TrainResult:
    """Where the run ended: its checkpoints, per-epoch metrics and the best validation record."""

    last_checkpoint: Path
    best_checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_losses(out: dict[str, Any], term_names: list[str]) -> torch.Tensor:
    """``[loss, *parts (in term order)]`` of one step's outputs, as one float32 tensor left on the device.

    The per-step record of the epoch loop (and its divergence guard) and of the bench's timed steps.
    """
    return torch.stack(
        [out["loss"].detach().float(), *(out["parts"][n].detach().float() for n in term_names)]
    )


def attacker_metrics(graph: TrainingGraph) -> list[str]:
    """``attacker/<metric>`` for each metric the graph's learned attacker reports (none without one)."""
    if graph.attacker is None:
        return []
    return [f"attacker/{m}" for m in graph.attacker.metric_names]


def learned_stats(out: dict[str, Any], names: list[str], device: torch.device) -> torch.Tensor:
    """The attacker's metrics of one step as a float32 device tensor, zeros where it did not learn."""
    if "attacker" not in out:
        return torch.zeros(len(names), device=device)
    return torch.stack([out["attacker"][n.split("/", 1)[1]].detach().float() for n in names])


def resolve_auto(flag: bool | str, device: torch.device) -> bool:
    """A fast-path switch: ``'auto'`` means on CUDA only."""
    return device.type == "cuda" if flag == "auto" else bool(flag)


@gin.configurable
class Trainer:
    """Epochs, optimizer, schedule and the fast-path switches of a training run.

    * ``amp``: bf16 autocast (``'auto'`` = on CUDA only; CPU bf16 is slow and changes numbers).
    * ``channels_last``: NHWC memory format for convolutions (``'auto'`` = on CUDA).
    * ``compile``: ``torch.compile`` the models in place (state_dict keys unchanged).
    * ``val_steps``: PGD steps for ``val/pgd<k>_acc``, the model-selection metric (20 in the papers).

    The divergence guard (always on; see ``components.guard``): a non-finite loss or loss term, a total loss
    above ``max_loss`` (None: no bound) or non-finite weights stop the run with ``TrainingDivergedError``.
    The record is read every ``check_every`` steps and before each epoch's validation and checkpoint, so
    ``last.pt`` always holds the last good epoch.

    Stabilizers, off by default because the papers do not use them (``gin/stable.gin`` turns them on):

    * ``grad_clip_norm``: clip the global gradient norm over every trained model (one optimizer) to this
      value before each step; the pre-clip norm is logged as ``train/grad_norm``.
    * ``lr_ramp_epochs``: multiply the schedule by a linear ramp from ~0 to 1 over this many epochs.
    """

    def __init__(
        self,
        epochs: int = gin.REQUIRED,
        optimizer: Callable[..., torch.optim.Optimizer] = sgd,
        schedule: Schedule | None = None,
        amp: bool | str = "auto",
        channels_last: bool | str = "auto",
        compile: bool = False,
        val_steps: int = 20,
        seed: int = 0,
        progress: bool = True,
        check_every: int = 10,
        max_loss: float | None = None,
        grad_clip_norm: float | None = None,
        lr_ramp_epochs: float = 0.0,
    ) -> None:
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"Trainer.epochs must be an integer >= 1, got {epochs!r}")
        if not (isinstance(check_every, int) and not isinstance(check_every, bool) and check_every >= 1):
            raise ValueError(f"Trainer.check_every must be an integer >= 1, got {check_every!r}")
        for name, value in (("max_loss", max_loss), ("grad_clip_norm", grad_clip_norm)):
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"Trainer.{name} must be a positive number or None, got {value!r}")
        if not (_is_number(lr_ramp_epochs) and lr_ramp_epochs >= 0):
            raise ValueError(f"Trainer.lr_ramp_epochs must be a number >= 0, got {lr_ramp_epochs!r}")
        self.epochs = epochs
        self.optimizer_fn = optimizer
        self.schedule = schedule if schedule is not None else PaperStepSchedule()
        self.amp, self.channels_last, self.compile = amp, channels_last, compile
        self.val_steps, self.seed, self.progress = val_steps, seed, progress
        self.check_every, self.max_loss = check_every, max_loss
        self.grad_clip_norm, self.lr_ramp_epochs = grad_clip_norm, lr_ramp_epochs

    @property
    def selection_metric(self) -> str:
        return f"val/pgd{self.val_steps}_acc"

    def uses_amp(self, device: torch.device) -> bool:
        """Whether steps on ``device`` run under bf16 autocast."""
        return resolve_auto(self.amp, device)

    def prepare(self, graph: TrainingGraph, device: torch.device) -> None:
        """Put the graph on ``device`` with the fast-path settings (channels_last, compile)."""
        graph.to(device)
        if resolve_auto(self.channels_last, device):
            graph.to(memory_format=torch.channels_last)
        if self.compile:
            for model in graph.models.values():
                model.compile()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast where ``amp`` says so, else a no-op context."""
        if self.uses_amp(device):
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(
        self,
        graph: TrainingGraph,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        device: torch.device,
    ) -> dict[str, Any]:
        """One optimizer step of the method: ``graph.step`` under autocast, backward, optional clipping, step,
        then ``graph.finish_step`` (restore a weight perturbation, post-step forwards).

        A learned attacker (``graph.attacker``) first takes its own step on the batch (it decides whether
        it learns at this call), at the target's current lr; its metrics come back as ``attacker``.
        Returns ``graph.step``'s outputs, plus ``grad_norm`` (the pre-clip global norm, on the device) when
        ``grad_clip_norm`` is set. Shared by the epoch loop and the benchmarks, so they time and study the
        step that training runs.
        """
        lr = optimizer.param_groups[0]["lr"]
        learned = graph.update_attacker(x, y, lr, lambda: self.autocast(device))
        with self.autocast(device):
            out = graph.step(x, y)
        try:
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if self.grad_clip_norm is not None:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm, foreach=True)
                out["grad_norm"] = norm.detach()
            optimizer.step()
        except BaseException:
            graph.restore()  # a weight perturbation never outlives its step
            raise
        # Restores a weight perturbation (AWP) right after the step, before anything reads the weights.
        with self.autocast(device):
            graph.finish_step()
        if learned is not None:
            out["attacker"] = learned
        return out

    def fit(
        self,
        graph: TrainingGraph,
        data: Any,
        device: torch.device | str,
        checkpoint_dir: str | Path,
        resume_from: str | Path | None = None,
        on_epoch_end: EpochCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train for ``epochs`` (continuing after the epoch stored in ``resume_from``, if given)."""
        device = torch.device(device)
        if graph.attacker is not None and dist.is_distributed():
            raise ValueError(
                "a learned attacker (TrainingGraph.attacker) learns from one process's batches; under "
                "torchrun each rank would train its own: run it on one process"
            )
        checkpoint_dir = Path(checkpoint_dir)
        last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
        torch.manual_seed(self.seed)
        data.setup()
        self.prepare(graph, device)
        if dist.is_distributed():
            graph.parallel = {n: dist.wrap(m, device) for n, m in graph.models.items()}
        rank, world = dist.rank(), dist.world_size()
        loader = data.train_loader(rank, world)
        steps_per_epoch = len(loader)
        optimizer = self.optimizer_fn(graph.models)
        scheduler = make_lr_scheduler(
            optimizer, self.schedule, steps_per_epoch, self.epochs, ramp_epochs=self.lr_ramp_epochs
        )
        if graph.attacker is not None:
            graph.attacker.bind(steps_per_epoch, self.epochs)
        guard = DivergenceGuard(
            list(graph.loss.terms) + attacker_metrics(graph),
            device,
            steps_per_epoch,
            self.check_every,
            self.max_loss,
        )
        start_epoch, history, best = 0, [], {self.selection_metric: -math.inf, "epoch": 0}
        if resume_from is not None:
            state = load_checkpoint(resume_from, map_location=device)
            for name, model in graph.models.items():
                model.load_state_dict(state["models"][name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if graph.attacker is not None:
                graph.attacker.load_training_state(state["attacker"])
            if len(state["ranks"]) != world:
                raise ValueError(
                    f"checkpoint {resume_from} was written by {len(state['ranks'])} process(es), "
                    f"this run has {world}: resume with the same number of processes"
                )
            loader.load_state_dict(state["ranks"][rank]["loader"])
            set_rng_state(state["ranks"][rank]["rng"])
            start_epoch, history, best = state["epoch"], list(state["history"]), dict(state["best"])

        for epoch in range(start_epoch + 1, self.epochs + 1):
            metrics = self._train_epoch(
                graph, loader, optimizer, scheduler, device, epoch, should_stop, guard
            )
            if rank == 0:
                # Validation on rank 0 only; the other ranks wait in the gather below.
                t_val = time.perf_counter()
                with self.autocast(device):
                    val = robust_accuracy(graph.target, data.val_loader(), attack_steps=self.val_steps)
                metrics.update({f"val/{k}": v for k, v in val.items()})
                metrics["epoch_time_s"] += time.perf_counter() - t_val
                metrics["epoch"] = epoch
                history.append(metrics)
            # RNG states after validation (it draws random starts), from every rank: a collective.
            rank_states = dist.gather_objects({"loader": loader.state_dict(), "rng": rng_state()})
            if rank == 0:
                if metrics[self.selection_metric] > best[self.selection_metric]:
                    best = {self.selection_metric: metrics[self.selection_metric], "epoch": epoch}
                    state = {"model": graph.target.state_dict(), "epoch": epoch, "metrics": metrics}
                    save_checkpoint(state, best_path)
                last = {
                    "epoch": epoch,
                    "models": {n: m.state_dict() for n, m in graph.models.items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ranks": rank_states,
                    "history": history,
                    "best": best,
                }
                if graph.attacker is not None:
                    last["attacker"] = graph.attacker.training_state()
                save_checkpoint(last, last_path)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, metrics, {"last": last_path, "best": best_path})
            dist.barrier()
        return TrainResult(last_path, best_path, history, best)

    def _train_epoch(
        self,
        graph: TrainingGraph,
        loader: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        epoch: int,
        should_stop: Callable[[], bool] | None,
        guard: DivergenceGuard,
    ) -> dict[str, float]:
        graph.train()
        graph.set_epoch(epoch, self.epochs)
        term_names = list(graph.loss.terms)
        # [total loss, each term, clean correct, adv correct], summed over examples, on the device.
        sums = torch.zeros(len(term_names) + 3, dtype=torch.float64, device=device)
        # The learned attacker's metrics, summed over the steps at which it learned (counted on the host).
        learned_names = attacker_metrics(graph)
        learned_sums = torch.zeros(len(learned_names), dtype=torch.float64, device=device)
        learned_count = 0
        grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        step = (epoch - 1) * len(loader)  # global step, 1-indexed once incremented
        seen = 0
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{self.epochs}",
            file=sys.stderr,
            disable=None if self.progress else True,  # None: off when stderr is not a terminal
            leave=False,
            dynamic_ncols=True,
        )
        distributed = dist.is_distributed()
        for x, y, _ in bar:
            stop = should_stop is not None and should_stop()
            if dist.any_rank(stop, device) if distributed else stop:
                raise TrainingInterruptedError(
                    f"stopped during epoch {epoch}; resume continues after epoch {epoch - 1}"
                )
            if distributed:
                dist.broadcast_buffers(graph.models)
            out = self.train_step(graph, optimizer, x, y, device)
            if "grad_norm" in out:
                grad_norm_sum += out["grad_norm"].double()
            scheduler.step()
            step += 1
            b = y.shape[0]
            stats = step_losses(out, term_names)
            if learned_names:
                # The guard watches the attacker's loss too (zeros at steps where it did not learn).
                learned = learned_stats(out, learned_names, device)
                if "attacker" in out:
                    learned_sums += learned.double()
                    learned_count += 1
                stats = torch.cat([stats, learned])
            guard.update(stats, step)
            if guard.due(step):
                self._check(guard, epoch, device)
            sums[: len(term_names) + 1] += stats[: len(term_names) + 1].double() * b
            sums[-2] += (out["clean_logits"].argmax(1) == y).sum()
            sums[-1] += (out["adv_logits"].argmax(1) == y).sum()
            seen += b
        # Before validation and the checkpoint: a diverged epoch never becomes last.pt or best.pt.
        self._check(guard, epoch, device)
        guard.check_parameters(graph.all_models.items(), epoch, step)
        if distributed:
            sums = dist.all_reduce_sum(torch.cat([sums, sums.new_tensor([seen])]))
            sums, seen = sums[:-1], int(sums[-1].item())
        values = (sums / max(seen, 1)).tolist()  # one read of the epoch's statistics
        train_time = time.perf_counter() - t0
        metrics = {"train/loss": values[0]}
        metrics.update({f"train/loss/{n}": v for n, v in zip(term_names, values[1:])})
        metrics.update(
            {
                "train/clean_acc": values[-2],
                "train/adv_acc": values[-1],
                "lr": lr,
                "train/images_per_s": seen / train_time,
                "epoch_time_s": train_time,
            }
        )
        if self.grad_clip_norm is not None:
            metrics["train/grad_norm"] = grad_norm_sum.item() / max(len(loader), 1)
        if learned_count:
            means = (learned_sums / learned_count).tolist()
            metrics.update({f"train/{n}": v for n, v in zip(learned_names, means)})
        return metrics

    @staticmethod
    def _check(guard: DivergenceGuard, epoch: int, device: torch.device) -> None:
        """Read the guard; under torchrun every rank stops together when one has diverged."""
        if not dist.is_distributed():
            guard.check(epoch)
            return
        try:
            guard.check(epoch)
        except TrainingDivergedError:
            dist.any_rank(True, device)
            raise
        if dist.any_rank(False, device):
            raise TrainingDivergedError(
                f"training diverged in epoch {epoch} on another rank (see its error)",
                epoch=epoch,
                step=0,
                term="loss",
                value=math.nan,
            )

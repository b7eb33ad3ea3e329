"""The authors' D2R-CAG training loop, written plainly: the speed baseline of ``pipeline.bench``.

This restates what ``D2R/D2R.py`` and ``D2R/train_D2R_cifar100.py`` (GitHub lusti-Yu/D2R, METHODS.md 1)
do per mini-batch, with none of robustflow's fast path, so the benchmark can time both on one machine:

* fp32 throughout (no autocast, no channels_last, no fused optimizer, no ``torch.compile``);
* a ``torch.utils.data.DataLoader`` over a torchvision-style ``Dataset`` of uint8 HWC images, augmented
  per sample on the host by ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip`` and ``ToTensor`` on PIL
  images (as ``torchvision.datasets.CIFAR10`` does); ``num_workers=1, pin_memory=True`` on CUDA, the
  defaults on CPU, as in the script;
* ``cudnn.deterministic = True``, as the script sets it;
* CAG with both models in eval mode, recomputing the guide's clean forward at *every* attack step;
* both models back in train mode for the three loss forwards, and the D2R loss
  ``CE(guide(x)) + MSE(target(x'), guide(x)) + 20 |kl1 - kl2| + 30 kl5`` with the ``1e-5`` helper and
  'mean' reductions; one SGD (lr 0.1, momentum 0.9, weight decay 2e-4) over both models;
* a ``loss.item()`` per batch for logging: a host sync every step. The published script formats the loss
  every ``log_interval`` (100) batches; the per-batch ``.item()`` is the common pattern this baseline
  stands for, and on a GPU it costs little next to a WRN-34-10 step.

Only the ``l_inf`` branch is kept (the script's ``l_2`` branch is unused). ``nn.DataParallel`` is left out:
on one GPU it is a pass-through.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# The authors' loss weights, hard-coded in D2R.py (lambda 1, beta 20, alpha 30; METHODS.md 1.3).
D2R_WEIGHTS = {"ce_guide": 1.0, "mse": 1.0, "kl_gap": 20.0, "kl_adv": 30.0}


class ArrayDataset(Dataset):
    """uint8 (N, H, W, C) images and labels served like ``torchvision.datasets.CIFAR10``: PIL + transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def cifar_train_transform() -> transforms.Compose:
    """The script's ``transform_train``: per-sample crop with 4-pixel padding, flip, [0, 1] tensor."""
    return transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )


def _kl_helper(a: Tensor, b: Tensor) -> Tensor:
    """D2R.py's ``criterion_kl`` helper, element-wise ``-a*b + log(b + 1e-5)*b`` (a log-probs, b probs)."""
    return -a * b + torch.log(b + 1e-5) * b


def d2r_loss_terms(out_adv: Tensor, out_natural: Tensor, out_guide: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The D2R loss of D2R.py on the three train-mode forwards, with its unweighted parts.

    ``out_adv = target(x')``, ``out_natural = target(x)``, ``out_guide = guide(x)``. Returns ``loss`` and
    ``ce_guide``, ``mse``, ``kl_gap`` (``|kl1 - kl2|``) and ``kl_adv`` (``kl5``), named as robustflow's
    ``gin/methods/d2r.gin`` names them. Nothing is detached.
    """
    kl1 = _kl_helper(F.log_softmax(out_guide, dim=1), F.softmax(out_natural, dim=1)).mean()
    kl2 = _kl_helper(F.log_softmax(out_natural, dim=1), F.softmax(out_guide, dim=1)).mean()
    kl5 = _kl_helper(F.log_softmax(out_guide, dim=1), F.softmax(out_adv, dim=1)).mean()
    parts = {
        "ce_guide": F.cross_entropy(out_guide, y),
        "mse": F.mse_loss(out_adv, out_guide),
        "kl_gap": torch.abs(kl1 - kl2),
        "kl_adv": kl5,
    }
    loss = parts["ce_guide"] + parts["mse"] + 20 * parts["kl_gap"] + 30 * parts["kl_adv"]
    return {"loss": loss, **parts}


def cag_attack(
    target: nn.Module,
    guide: nn.Module,
    x_natural: Tensor,
    step_size: float = 0.007,
    epsilon: float = 0.031,
    perturb_steps: int = 10,
) -> Tensor:
    """D2R.py's collaborative adversarial generation, as written (guide forward recomputed every step)."""
    target.eval()
    guide.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn_like(x_natural).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = _kl_helper(
                F.log_softmax(target(x_adv), dim=1), F.softmax(guide(x_natural), dim=1)
            ).sum()
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    target.train()
    guide.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def d2r_step(
    target: nn.Module,
    guide: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    step_size: float = 0.007,
    epsilon: float = 0.031,
    perturb_steps: int = 10,
) -> dict[str, Tensor]:
    """One training step of the script: zero_grad, CAG, three train-mode forwards, D2R loss, backward, SGD."""
    optimizer.zero_grad()
    x_adv = cag_attack(target, guide, x, step_size, epsilon, perturb_steps)
    optimizer.zero_grad()  # D2R_loss zeroes the gradients again after the attack
    out = d2r_loss_terms(target(x_adv), target(x), guide(x), y)
    out["loss"].backward()
    optimizer.step()
    return out


def reference_flop_counts(attack_steps: int) -> dict[str, dict[str, int]]:
    """Passes per training image the reference loop executes, per model (see ``pipeline.bench``'s formula).

    ``fwd``: forwards; ``bwd_input``: backwards for the input gradient only (about 1x a forward);
    ``bwd_full``: backwards that also produce weight gradients (about 2x a forward). The guide runs once per
    attack step (recomputed), then once in train mode for the loss.
    """
    return {
        "target": {"fwd": attack_steps + 2, "bwd_input": attack_steps, "bwd_full": 2},
        "guide": {"fwd": attack_steps + 1, "bwd_input": 0, "bwd_full": 1},
    }


def _batches(loader: DataLoader, count: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``count`` batches, starting new epochs (new shuffles, new worker pools) as the script's loop would."""
    done = 0
    while done < count:
        for batch in loader:
            yield batch
            done += 1
            if done == count:
                return


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); a no-op on CPU, where work is synchronous."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated device memory on CUDA; on CPU the process's peak resident set size (high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _cudnn_deterministic() -> Iterator[None]:
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = before


def run_reference(
    target: nn.Module,
    guide: nn.Module,
    x_uint8: np.ndarray | Tensor,
    y: np.ndarray | Tensor | Sequence[int],
    steps: int,
    batch_size: int,
    device: torch.device | str,
    attack_steps: int = 10,
    warmup: int = 1,
    epsilon: float = 0.031,
    step_size: float = 0.007,
    num_workers: int | None = None,
    seed: int = 1,
    lr: float = 0.1,
) -> dict[str, Any]:
    """Train ``target`` and ``guide`` with the reference loop for ``warmup + steps`` batches; time ``steps``.

    ``x_uint8`` is (N, H, W, C) uint8 (the layout of ``torchvision.datasets.CIFAR10.data``); the loop cycles
    over it as epochs when it has fewer than ``(warmup + steps) * batch_size`` images. The models are
    trained in place (moved to ``device``). Returns images/s and seconds per step over the timed steps
    (data loading included, as in the script), each timed step's milliseconds, the
    per-batch logged losses, the last step's unweighted loss parts, and peak memory (see
    :func:`peak_memory_mib`). ``lr`` is fixed for every step (the script sets 0.02 for its first epoch
    and 0.1 from the second).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = torch.device(device)
    images = x_uint8.cpu().numpy() if isinstance(x_uint8, Tensor) else np.asarray(x_uint8)
    labels = y.cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    torch.manual_seed(seed)
    if num_workers is None:
        num_workers = 1 if device.type == "cuda" else 0
    loader = DataLoader(
        ArrayDataset(images, labels, cifar_train_transform()),
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    target.to(device).train()
    guide.to(device).train()
    optimizer = torch.optim.SGD(
        [{"params": target.parameters()}, {"params": guide.parameters()}],
        lr=lr,
        momentum=0.9,
        weight_decay=2e-4,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    step_ms: list[float] = []
    seen = 0
    t_start = t_warm = time.perf_counter()
    out: dict[str, Tensor] = {}
    with _cudnn_deterministic():
        for i, (data, labels_b) in enumerate(_batches(loader, warmup + steps)):
            if i == warmup:
                sync_device(device)
                t_start = t_last = time.perf_counter()
            data, labels_b = data.to(device), labels_b.to(device)
            out = d2r_step(target, guide, optimizer, data, labels_b, step_size, epsilon, attack_steps)
            losses.append(out["loss"].item())  # the per-batch log line: a host sync every step
            if i >= warmup:
                seen += labels_b.shape[0]
                # .item() has synchronized: end-to-end time of this step, fetching its batch included.
                now = time.perf_counter()
                step_ms.append(1000 * (now - t_last))
                t_last = now
        sync_device(device)
    elapsed = time.perf_counter() - t_start
    return {
        "images_per_s": seen / elapsed,
        "step_s": elapsed / steps,
        "step_ms_each": step_ms,
        "timed_steps": steps,
        "warmup_s": t_start - t_warm,
        "images": seen,
        "losses": losses,
        "parts": {k: float(v.detach()) for k, v in out.items() if k != "loss"},
        "peak_mem_mib": peak_memory_mib(device),
    }

"""Learning-rate schedules (METHODS.md 1.1, 2, 3.2): the lr each training iteration actually uses.

The schedules are driven exactly as the training loop drives them: ``make_lr_scheduler`` on a real SGD,
the lr read from the optimizer before the iteration's ``optimizer.step()``, then ``scheduler.step()``.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from components.schedules import (
    MultiStepSchedule,
    PaperStepSchedule,
    Schedule,
    make_lr_scheduler,
)

BASE_LR = 0.1


# Tiny tensors: intra-op threads only add contention when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def sgd(lr: float = BASE_LR) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9, weight_decay=2e-4)


def lrs_used(schedule: Schedule, steps_per_epoch: int, epochs: int, base_lr: float = BASE_LR) -> list[float]:
    """The lr of every iteration of the run, as the training loop sees it."""
    opt = sgd(base_lr)
    scheduler = make_lr_scheduler(opt, schedule, steps_per_epoch, epochs)
    used = []
    for _ in range(steps_per_epoch * epochs):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return used


def per_epoch(lrs: list[float], steps_per_epoch: int) -> dict[int, set[float]]:
    """1-indexed epoch -> the set of lrs used during it (rounded to absorb float noise)."""
    out: dict[int, set[float]] = {}
    for i, lr in enumerate(lrs):
        out.setdefault(i // steps_per_epoch + 1, set()).add(round(lr, 12))
    return out


# ------------------------------------------------------------------------------------- paper step


def test_paper_step_schedule_is_lbgat_d2r_adjust_learning_rate():
    # METHODS.md 1.1: epoch 1 -> 0.02, 2-75 -> 0.1, 76-90 -> 0.01, 91-100 -> 0.001; set per epoch.
    lrs = lrs_used(PaperStepSchedule(), steps_per_epoch=10, epochs=100)
    assert len(lrs) == 1000
    epochs = per_epoch(lrs, 10)
    for epoch in range(1, 101):
        if epoch == 1:
            expected = 0.02
        elif epoch <= 75:
            expected = 0.1
        elif epoch <= 90:
            expected = 0.01
        else:
            expected = 0.001
        assert epochs[epoch] == {round(expected, 12)}, f"epoch {epoch}: {epochs[epoch]}"


def test_paper_step_schedule_changes_exactly_at_epoch_boundaries():
    lrs = lrs_used(PaperStepSchedule(), steps_per_epoch=10, epochs=100)
    changes = [i for i in range(1, len(lrs)) if not math.isclose(lrs[i], lrs[i - 1])]
    assert changes == [10, 750, 900]  # first iterations of epochs 2, 76 and 91


def test_trades_schedule_with_absolute_milestones_over_76_epochs():
    # METHODS.md 2: TRADES, 76 epochs, lr 0.1, x0.1 at epochs 75/90/100, no warm-up.
    schedule = PaperStepSchedule(warmup_epochs=0, milestone_epochs=(75, 90, 100))
    lrs = lrs_used(schedule, steps_per_epoch=10, epochs=76)
    epochs = per_epoch(lrs, 10)
    assert len(epochs) == 76
    for epoch in range(1, 75):
        assert epochs[epoch] == {0.1}, epoch
    assert epochs[75] == {0.01} and epochs[76] == {0.01}


def test_paper_step_schedule_scales_with_the_run_length():
    # Milestones are fractions of the run: 0.75 * 20 = 15 and 0.9 * 20 = 18.
    epochs = per_epoch(lrs_used(PaperStepSchedule(), steps_per_epoch=3, epochs=20), 3)
    assert [min(epochs[e]) for e in (1, 2, 15, 16, 18, 19, 20)] == pytest.approx(
        [0.02, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )


# ------------------------------------------------------------------------------------- multi-step


def test_multistep_schedule_is_pgk_per_iteration_multisteplr():
    # METHODS.md 3.2: 110 epochs, x0.1 at 100/110 and 105/110 of all iterations (here 1100).
    lrs = lrs_used(MultiStepSchedule(), steps_per_epoch=10, epochs=110)
    first, second = int(100 / 110 * 1100), int(105 / 110 * 1100)
    assert (first, second) == (1000, 1050)
    assert lrs[:first] == pytest.approx([0.1] * first)
    assert lrs[first:second] == pytest.approx([0.01] * (second - first))
    assert lrs[second:] == pytest.approx([0.001] * (1100 - second))


def test_multistep_schedule_drops_mid_epoch_when_the_fraction_says_so():
    # 7 iterations/epoch x 11 epochs = 77 iterations: int(100/110 * 77) = 70, int(105/110 * 77) = 73.
    lrs = lrs_used(MultiStepSchedule(), steps_per_epoch=7, epochs=11)
    assert lrs[69] == pytest.approx(0.1) and lrs[70] == pytest.approx(0.01)
    assert lrs[72] == pytest.approx(0.01) and lrs[73] == pytest.approx(0.001)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="steps_per_epoch >= 1 and epochs >= 1"):
        PaperStepSchedule().bind(0, 100)
    with pytest.raises(ValueError, match="steps_per_epoch >= 1 and epochs >= 1"):
        make_lr_scheduler(sgd(), MultiStepSchedule(), steps_per_epoch=10, epochs=0)


# ------------------------------------------------------------------------------------- resume


SCHEDULES = {
    "paper_step": lambda: PaperStepSchedule(),
    "trades": lambda: PaperStepSchedule(warmup_epochs=0, milestone_epochs=(5, 7)),
    "multistep": lambda: MultiStepSchedule(),
}


@pytest.mark.parametrize("k", [1, 23, 39])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_state_dict_round_trip_continues_the_same_lr_sequence(name, k):
    steps_per_epoch, epochs = 5, 8
    reference = lrs_used(SCHEDULES[name](), steps_per_epoch, epochs)

    opt = sgd()
    scheduler = make_lr_scheduler(opt, SCHEDULES[name](), steps_per_epoch, epochs)
    used = []
    for _ in range(k):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    buf = io.BytesIO()  # the checkpoint is read back with weights_only=True
    torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt = sgd()
    scheduler = make_lr_scheduler(opt, SCHEDULES[name](), steps_per_epoch, epochs)
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for _ in range(k, steps_per_epoch * epochs):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert used == pytest.approx(reference, rel=1e-12, abs=0)


def test_scheduler_state_alone_resumes_at_the_saved_iteration():
    # The resumed scheduler continues from the saved iteration even if only the scheduler state is loaded:
    # its next step computes base_lr * factor(k) from the restored counter.
    opt = sgd()
    scheduler = make_lr_scheduler(opt, PaperStepSchedule(), steps_per_epoch=10, epochs=100)
    for _ in range(755):
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["last_epoch"] == 755

    opt2 = sgd()
    scheduler2 = make_lr_scheduler(opt2, PaperStepSchedule(), steps_per_epoch=10, epochs=100)
    scheduler2.load_state_dict(state)
    opt2.step()
    scheduler2.step()  # now at iteration 756, epoch 76
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)

"""FLOPs per training image, counted in forward-pass equivalents of each backbone (``F_m`` =
``count_forward_flops(m, (C, H, W))``, 2 x MACs of convs and matrix products):

    FLOPs/image = sum_m F_m * (fwd_m + 1 * bwd_input_m + 2 * bwd_full_m)

* ``fwd``: forwards. The attack runs the attacked model once per step (``PGDGenerator.steps``; with
  ``init_view`` the first of them is also the loss view at x_init); a soft-label objective
  (TRADES/LBGAT/CAG) adds one no-grad forward of its soft-label model per batch; each loss view not
  produced by the attack is one forward; the step's accuracy metrics add a no-grad forward of the
  evaluated model on x or x_adv when no loss view already reads it.
* ``bwd_input``: one per attack step: the gradient w.r.t. the input only (parameters frozen), which
  costs about one forward (activation gradients, no weight gradients).
* ``bwd_full``: one per loss view: input and weight gradients, about two forwards.
* The optimizer, BN, activations and the loss terms are left out (O(parameters) or memory-bound).

So D2R-CAG with S attack steps costs ``(2S + 6) F_t + 4 F_g`` (target: S + 2 forwards, S input-only
backwards, 2 full backwards; guide: the soft label and the ``guide(x)`` view, 1 full backward), and the
authors' loop, which recomputes the guide at every attack step, ``(2S + 6) F_t + (S + 3) F_g``.

The pass counts are derived from the graph's parts rather than measured: ``FlopCounterMode`` counts a
forward well (``count_forward_flops`` uses it) but fails around the attack's ``torch.autograd.grad``, so
it cannot count a whole training step.

Achieved TFLOP/s = FLOPs/image x images/s. The fraction of peak divides it by ``--peak-tflops``: by
default 790 on CUDA, the measured bf16 dense matrix rate of H100/H200 named in the "Speed and scale"
issue; on CPU no fraction unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def graph_pass_counts(graph: Any) -> dict[str, dict[str, int]]:
    """Forwards and backwards per training image, per model, of one ``TrainingGraph.step`` + backward.

    Derived from the graph's parts (see the module docstring): the attack's steps, objective and
    ``init_view``, the loss's views, and the metrics' extra forwards.
    """
    from components.views import parse_view

    counts = {name: {"fwd": 0, "bwd_input": 0, "bwd_full": 0} for name in graph.models}
    generator = graph.generator
    objective = generator.objective
    attacked = objective.model
    # Soft-label objectives run their soft-label model once per batch (prepare), not once per step.
    soft = getattr(objective, "soft_label_model", None)
    if soft is not None:
        counts[soft]["fwd"] += 1
    counts[attacked]["fwd"] += generator.steps
    counts[attacked]["bwd_input"] += generator.steps
    from_attack = {f"{attacked}(x_init)"} if generator.init_view else set()
    for view in graph.loss.views:
        model = parse_view(view).model
        if view not in from_attack:
            counts[model]["fwd"] += 1
        counts[model]["bwd_full"] += 1
    for inp in ("x", "x_adv"):
        if f"{graph.eval_model}({inp})" not in graph.loss.views:
            counts[graph.eval_model]["fwd"] += 1
    return counts


def flops_per_image(counts: Mapping[str, Mapping[str, int]], forward_flops: Mapping[str, int]) -> float:
    """``sum_m F_m * (fwd + bwd_input + 2 * bwd_full)``: forward-pass equivalents times each model's F."""
    return float(
        sum(forward_flops[m] * (c["fwd"] + c["bwd_input"] + 2 * c["bwd_full"]) for m, c in counts.items())
    )


def describe_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """``'target 12 fwd + 10 bwd_in + 2 bwd = 26 F; guide ...'`` for the FLOP accounting table."""
    parts = []
    for m, c in counts.items():
        equiv = c["fwd"] + c["bwd_input"] + 2 * c["bwd_full"]
        parts.append(f"{m}: {c['fwd']} fwd + {c['bwd_input']} bwd_in + {c['bwd_full']} bwd = {equiv} F")
        if equiv == 0:
            parts[-1] = f"{m}: unused"
    return "; ".join(parts)


def achieved(flops: float, images_per_s: float, peak_tflops: float | None) -> dict[str, float | None]:
    """``achieved_tflops`` (FLOPs/image x images/s) and ``peak_fraction`` (of ``peak_tflops``, if given)."""
    tflops = flops * images_per_s / 1e12
    return {"achieved_tflops": tflops, "peak_fraction": tflops / peak_tflops if peak_tflops else None}

"""Loss terms against values computed by hand (plain Python math) on fixed logits (METHODS.md 1.3, 3.3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from components.losses import KL, MSE, CrossEntropy, KLGap, LabelSmoothedCE, WeightedLoss, kl_div

# Two examples, three classes: small enough to do by hand, asymmetric enough to catch a swapped argument.
ZA = [[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]]
ZB = [[0.0, 1.0, 0.5], [1.5, -0.5, 0.2]]
Y = [0, 2]


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def kl_by_hand(inp, tgt, eps=0.0):
    """KLdiv(inp || tgt) element-wise in PyTorch order: q_t * (log(q_t + eps) - log q_in)."""
    out = []
    for a, b in zip(inp, tgt):
        qa, qb = softmax(a), softmax(b)
        out.append([pb * (math.log(pb + eps) - math.log(pa)) for pa, pb in zip(qa, qb)])
    return out


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def views():
    return {"a(x)": t(ZA), "b(x)": t(ZB)}


def test_kl_mean_is_average_over_all_b_times_k_elements():
    elems = kl_by_hand(ZA, ZB)
    expected = sum(sum(r) for r in elems) / 6
    assert kl_div(t(ZA), t(ZB), "mean").item() == pytest.approx(expected, rel=1e-9)


def test_kl_batchmean_and_sum_and_their_ratio_to_mean():
    elems = kl_by_hand(ZA, ZB)
    total = sum(sum(r) for r in elems)
    assert kl_div(t(ZA), t(ZB), "batchmean").item() == pytest.approx(total / 2, rel=1e-9)
    assert kl_div(t(ZA), t(ZB), "sum").item() == pytest.approx(total, rel=1e-9)
    # mean = batchmean / K: alpha = 30 under 'mean' is alpha = 3 under 'batchmean' for K = 10.
    assert kl_div(t(ZA), t(ZB), "mean").item() * 3 == pytest.approx(kl_div(t(ZA), t(ZB), "batchmean").item())


def test_kl_direction_second_view_is_the_target_distribution():
    """KL(input=a, target=b) = sum q_b (log q_b - log q_a), i.e. KL(q_b || q_a) in math notation."""
    term = KL(input="a(x)", target="b(x)", reduction="batchmean")
    by_hand = sum(sum(r) for r in kl_by_hand(ZA, ZB)) / 2
    swapped = sum(sum(r) for r in kl_by_hand(ZB, ZA)) / 2
    assert term(views(), None).item() == pytest.approx(by_hand, rel=1e-9)
    assert abs(by_hand - swapped) > 1e-3  # the test would notice a swapped direction


def test_kl_with_target_eps_reproduces_the_authors_helper():
    """D2R code: kl(a, b) = b * (log(b + 1e-5) - a), eps only inside the log of the target probabilities."""
    term = KL(input="a(x)", target="b(x)", reduction="mean", target_eps=1e-5)
    expected = sum(sum(r) for r in kl_by_hand(ZA, ZB, eps=1e-5)) / 6
    assert term(views(), None).item() == pytest.approx(expected, rel=1e-9)
    assert term(views(), None).item() != pytest.approx(kl_div(t(ZA), t(ZB), "mean").item(), rel=1e-9)


def test_kl_gradient_flows_into_both_views_unless_detached():
    a, b = t(ZA).requires_grad_(), t(ZB).requires_grad_()
    KL(input="a(x)", target="b(x)")({"a(x)": a, "b(x)": b}, None).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    a2, b2 = t(ZA).requires_grad_(), t(ZB).requires_grad_()
    KL(input="a(x)", target="b(x)", detach_target=True)({"a(x)": a2, "b(x)": b2}, None).backward()
    assert a2.grad.abs().sum() > 0 and b2.grad is None


def test_kl_gap_is_absolute_difference_of_the_two_directions():
    """D2R's beta term |kl1 - kl2| with kl1 = KLdiv(z_g || z_t), kl2 = KLdiv(z_t || z_g), 'mean'."""
    kl1 = sum(sum(r) for r in kl_by_hand(ZA, ZB)) / 6
    kl2 = sum(sum(r) for r in kl_by_hand(ZB, ZA)) / 6
    gap = KLGap(a="a(x)", b="b(x)", reduction="mean")
    assert gap(views(), None).item() == pytest.approx(abs(kl1 - kl2), rel=1e-9)
    a, b = t(ZA).requires_grad_(), t(ZB).requires_grad_()
    gap({"a(x)": a, "b(x)": b}, None).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_mse_on_logits_is_mean_over_b_times_k():
    expected = sum((p - q) ** 2 for ra, rb in zip(ZA, ZB) for p, q in zip(ra, rb)) / 6
    term = MSE(input="a(x)", target="b(x)")
    assert term(views(), None).item() == pytest.approx(expected, rel=1e-9)
    a, b = t(ZA).requires_grad_(), t(ZB).requires_grad_()
    term({"a(x)": a, "b(x)": b}, None).backward()
    # d/da mean((a-b)^2) = 2(a-b)/(B*K): both sides receive gradient (nothing detached).
    assert torch.allclose(a.grad, 2 * (t(ZA) - t(ZB)) / 6)
    assert torch.allclose(b.grad, -2 * (t(ZA) - t(ZB)) / 6)


def test_cross_entropy_is_batch_mean_of_minus_log_softmax_true_class():
    expected = -sum(math.log(softmax(r)[y]) for r, y in zip(ZA, Y)) / 2
    assert CrossEntropy(view="a(x)")(views(), torch.tensor(Y)).item() == pytest.approx(expected, rel=1e-9)


def test_label_smoothed_ce_uses_pgk_factor_not_torch_label_smoothing():
    """PGK: `factor` on the true class and (1 - factor)/(K - 1) on each other class."""
    factor = 0.6
    expected = 0.0
    for r, y in zip(ZA, Y):
        q = softmax(r)
        soft = [factor if k == y else (1 - factor) / 2 for k in range(3)]
        expected -= sum(s * math.log(p) for s, p in zip(soft, q))
    expected /= 2
    term = LabelSmoothedCE(view="a(x)", factor=factor)
    assert term(views(), torch.tensor(Y)).item() == pytest.approx(expected, rel=1e-9)
    torch_ls = F.cross_entropy(t(ZA), torch.tensor(Y), label_smoothing=1 - factor).item()
    assert term(views(), torch.tensor(Y)).item() != pytest.approx(torch_ls, rel=1e-9)


def test_d2r_total_matches_the_authors_formula_by_hand():
    """loss = CE(z_g, y) + MSE(z_a, z_g) + 20 |kl1 - kl2| + 30 kl5 (D2R.py), with the 1e-5 helper."""
    z_a, z_t, z_g = ZA, ZB, [[0.3, -0.2, 0.9], [1.0, 0.0, -1.0]]
    eps = 1e-5
    ce = -sum(math.log(softmax(r)[y]) for r, y in zip(z_g, Y)) / 2
    mse = sum((p - q) ** 2 for ra, rb in zip(z_a, z_g) for p, q in zip(ra, rb)) / 6
    kl1 = sum(sum(r) for r in kl_by_hand(z_g, z_t, eps)) / 6
    kl2 = sum(sum(r) for r in kl_by_hand(z_t, z_g, eps)) / 6
    kl5 = sum(sum(r) for r in kl_by_hand(z_g, z_a, eps)) / 6
    expected = ce + mse + 20 * abs(kl1 - kl2) + 30 * kl5
    loss = WeightedLoss(
        terms={
            "ce_guide": (1.0, CrossEntropy(view="guide(x)")),
            "mse": (1.0, MSE(input="target(x_adv)", target="guide(x)")),
            "kl_gap": (20.0, KLGap(a="guide(x)", b="target(x)", target_eps=eps)),
            "kl_adv": (30.0, KL(input="guide(x)", target="target(x_adv)", target_eps=eps)),
        }
    )
    vs = {"target(x_adv)": t(z_a), "target(x)": t(z_t), "guide(x)": t(z_g)}
    total, parts = loss(vs, torch.tensor(Y))
    assert total.item() == pytest.approx(expected, rel=1e-9)
    assert parts["kl_adv"].item() == pytest.approx(kl5, rel=1e-9)
    assert loss.views == ["guide(x)", "target(x_adv)", "target(x)"]


def test_regmix_terms_by_hand():
    """CE(z_f) + a KLdiv(z_f || z_i) + b KLdiv(z_i || z_f) + g KLdiv(z_f || z_0), 'mean' (METHODS.md 3.3)."""
    z_f, z_i, z_0 = ZA, ZB, [[0.3, -0.2, 0.9], [1.0, 0.0, -1.0]]
    a, b, g = 50.0, 20.0, 20.0
    ce = -sum(math.log(softmax(r)[y]) for r, y in zip(z_f, Y)) / 2
    main = sum(sum(r) for r in kl_by_hand(z_f, z_i)) / 6
    aux = sum(sum(r) for r in kl_by_hand(z_i, z_f)) / 6
    agr = sum(sum(r) for r in kl_by_hand(z_f, z_0)) / 6
    loss = WeightedLoss(
        terms={
            "ce_adv": (1.0, CrossEntropy(view="target(x_adv)")),
            "amr_main": (a, KL(input="target(x_adv)", target="target(x_init)")),
            "amr_aux": (b, KL(input="target(x_init)", target="target(x_adv)")),
            "agr": (g, KL(input="target(x_adv)", target="target(x)")),
        }
    )
    vs = {"target(x_adv)": t(z_f), "target(x_init)": t(z_i), "target(x)": t(z_0)}
    total, _ = loss(vs, torch.tensor(Y))
    assert total.item() == pytest.approx(ce + a * main + b * aux + g * agr, rel=1e-9)


def test_bf16_logits_are_computed_in_float32():
    vs = {"a(x)": t(ZA).bfloat16(), "b(x)": t(ZB).bfloat16()}
    assert KL(input="a(x)", target="b(x)")(vs, None).dtype == torch.float32
    assert MSE(input="a(x)", target="b(x)")(vs, None).dtype == torch.float32


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: KL(input="a(x)", target="b(x)", reduction="avg"), "unknown reduction"),
        (lambda: KL(input="a", target="b(x)"), "expected 'model(input)'"),
        (lambda: MSE(input="a(x_foo)", target="b(x)"), "unknown input"),
        (lambda: WeightedLoss(terms={}), "empty"),
        (lambda: WeightedLoss(terms={"x": CrossEntropy(view="a(x)")}), "must be (weight, term)"),
        (lambda: LabelSmoothedCE(view="a(x)", factor=1.5), "factor"),
    ],
)
def test_bad_term_declarations_fail_with_a_message(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()

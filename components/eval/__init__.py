"""Robustness evaluation in one place, apart from the training code.

* ``attacks``: the evaluation attacks PGD and CW (gin configurables) and ``robust_accuracy``, the PGD-20
  accuracy that training uses for model selection;
* ``autoattack``: AutoAttack through ``pyautoattack``, stage by stage (gin configurable);
* ``checks``: the checks whose flags say when an evaluation cannot be trusted;
* ``robustness``: ``evaluate_robustness``, every attack at every radius with the per-example worst case;
* ``report``: ``EvalReport``, what an evaluation returns, and its renderings;
* ``suite``: the named suites ``quick``, ``paper`` and ``full``.

The training attacks (generators of adversarial examples for the loss) live in ``components.attacks``.
"""

from components.eval import attacks, autoattack, checks, report, robustness, suite  # noqa: F401  (gin)

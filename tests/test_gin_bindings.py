"""Every experiment's gin bindings equal the golden record (tests/gin_bindings.json; see gin_bindings.py).

A restructuring of gin/ (fragments moved, merged or split) must leave every experiment, alone and with its
profiles, binding the same values. A failure lists each binding that differs; regenerate the record only
for an intended change of values: ``PYTHONPATH=$PWD python tests/gin_bindings.py --write``.
"""

import pytest
from gin_bindings import PROFILES, bindings_of, diff, expected, experiments, load_golden

GOLDEN = load_golden()


def test_the_recorded_experiments_are_the_experiments():
    assert experiments() == sorted(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_bindings_are_unchanged(name, profile):
    spec = name if profile is None else f"{name},{profile}"
    differences = diff(expected(GOLDEN, name, profile), bindings_of(spec))
    assert not differences, f"-P gin={spec} binds other values than recorded:\n" + "\n".join(differences)


def test_a_changed_value_is_reported():
    want = {"ALPHA": "30.0", "kl_adv/KL.reduction": "%KL_REDUCTION"}
    got = {"ALPHA": "3.0", "kl_adv/KL.reduction": "'mean'", "BETA": "20.0"}
    assert diff(want, got) == [
        "  ~ ALPHA: 30.0 -> 3.0",
        "  + BETA = 20.0   (newly bound)",
        "  ~ kl_adv/KL.reduction: %KL_REDUCTION -> 'mean'",
    ]
    assert diff(want, {"ALPHA": "30.0"}) == ["  - kl_adv/KL.reduction = %KL_REDUCTION   (no longer bound)"]

"""Config input edges through the train entry point: refused with a hint, exit 2, before any run exists."""

from pathlib import Path

import pytest

from pipeline.config import GIN_DIR, ConfigError, is_experiment, load_config
from pipeline.train import EXIT_USAGE, main


@pytest.mark.parametrize(
    "gin_spec, message",
    [
        ("smoke", "names only profile(s) (smoke), no experiment"),
        (
            "smoke,d2r_cag_cifar10",
            "puts profile smoke before the experiment d2r_cag_cifar10: profiles go last",
        ),
    ],
)
def test_profile_alone_or_first_is_refused(gin_spec, message, mlflow_store, capsys):
    assert main(["--gin", gin_spec, "--device", "cpu"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "--gin d2r_cag_cifar10,smoke" in err, err
    assert "Traceback" not in err and not Path("mlflow.db").exists()


def test_gin_arithmetic_gets_the_literal(mlflow_store, capsys):
    args = ["--gin", "d2r_cag_cifar10,smoke", "--device", "cpu", "--overrides", "EPS = 8/255"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "gin has no arithmetic" in err and "EPS = 0.03137254901960784" in err, err
    assert not Path("mlflow.db").exists()


def test_every_top_level_file_is_an_experiment_or_a_profile(tmp_path):
    profiles = {p.stem for p in GIN_DIR.glob("*.gin") if not is_experiment(p)}
    assert "smoke" in profiles and "d2r_cag_cifar10" not in profiles
    # A user's file that includes an experiment (as tune's best_params.gin does) is an experiment too.
    user = tmp_path / "mine.gin"
    user.write_text("include 'd2r_cag_cifar10.gin'\nALPHA = 10.0\n")
    assert is_experiment(user)
    assert load_config(f"{user},smoke").experiment == "mine"
    with pytest.raises(ConfigError, match="profiles go last"):
        load_config(f"smoke,{user}")


def test_strings_and_negative_numbers_are_not_arithmetic():
    loaded = load_config("d2r_cag_cifar10,smoke", "MODEL_NAME = 'a/b'; ALPHA = -3")
    assert loaded.overrides == ["MODEL_NAME = 'a/b'", "ALPHA = -3"]

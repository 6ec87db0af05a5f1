"""`retrac train`: config files, flag overrides and bad values."""

from __future__ import annotations

import json

from cli import main
from retrac.replay import TrainingRun


def test_flags_override_the_config_file(tmp_path, capsys) -> None:
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "dataset": {"source": "builtin:digits", "resolution": 8, "limit": 10},
        "preset": "micro", "epochs": 5, "save_every": 1, "loss": "l1",
    }))
    assert (
        main(["train", str(tmp_path / "run"), "--config", str(config), "--epochs", "2", "--limit", "6"]) == 0
    )
    run = TrainingRun.load(tmp_path / "run")
    assert (run.spec.epochs, run.spec.preset, run.spec.loss, run.spec.dataset.limit) == (2, "micro", "l1", 6)
    assert run.spec.dataset.resolution == 8
    assert len(run.sample_ids) == 6
    assert [c.epoch for c in run.checkpoints()] == [1, 2]
    assert "2 checkpoints" in capsys.readouterr().out


def test_bad_values_exit_2_with_one_line(tmp_path, capsys) -> None:
    assert main(["train", str(tmp_path / "run"), "--epochs", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("retrac: error: --epochs:")
    assert error.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_every_help_shows_the_defaults(capsys) -> None:
    import pytest

    for command, says in (
        (["index", "create"], "grid timestep slots per sample [default: 8]"),
        (["index", "create"], "[default: shared]"),
        (["attribute"], "proponents and opponents per method [default: 10]"),
        (["train"], "--epochs <int> training epochs [default: (10)]"),
        (["serve"], "[default: 8000]"),
    ):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert says in " ".join(capsys.readouterr().out.split()), command
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("retrac ")


NO_DEFAULT = {"config", "spec", "run_folder", "checkpoint", "train_batch_size", "limit", "gallery",
              "hostname"}
"""Options absent unless given: a file to read or write, a name, a count that only a typed value sets."""


def test_every_option_with_a_default_shows_it() -> None:
    import typer

    from cli import app

    def commands(group):
        for name, command in group.commands.items():
            yield from commands(command) if hasattr(command, "commands") else [(name, command)]

    for name, command in commands(typer.main.get_command(app)):
        for option in command.params:
            if getattr(option, "is_flag", False) or option.required or option.name in {"help", *NO_DEFAULT}:
                continue
            assert option.default is not None or isinstance(option.show_default, str), (name, option.name)


def test_bad_flags_exit_2_with_one_line(capsys) -> None:
    import pytest

    for argv, says in ((["attribute", "s.zarr", "q.png", "--top-k", "many"], "--top-k"),
                       (["index", "create", "s.zarr", "--dtype", "int8"], "--dtype"),
                       (["index", "run"], "Missing argument"),
                       (["attribute", "s", "q", "--frobnicate"], "--frobnicate")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        error = capsys.readouterr().err
        assert exited.value.code == 2, error
        assert error.startswith("retrac: error:"), error
        assert error.count("\n") == 1, error
        assert says in error
        assert "Usage" not in error


def test_the_shell_completion_script_names_the_command(capsys, monkeypatch) -> None:
    import pytest

    # Without this, typer detects the shell from the parent processes and ignores the "bash"
    # argument; under a parent that is not a shell (CI runners) it then fails.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    with pytest.raises(SystemExit) as exited:
        main(["--show-completion", "bash"])
    assert exited.value.code == 0
    assert "_RETRAC_COMPLETE=complete_bash" in capsys.readouterr().out

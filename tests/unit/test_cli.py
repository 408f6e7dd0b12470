"""The CLI: every subcommand exists, and every option explains itself in --help."""

import argparse
import importlib

import pytest

from jobs.cli import SUBCOMMANDS, build_parser, main

EXPECTED = {"generate-logs", "build-dataset", "train", "embed", "evaluate", "nightly", "demo"}


def test_the_issue_subcommands_are_registered():
    assert EXPECTED <= set(SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_option_has_help(name):
    module_name, _ = SUBCOMMANDS[name]
    assert importlib.util.find_spec(module_name) is not None, f"{module_name} is missing"
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} needs a docstring (it is the --help description)"
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, (
            f"twotower {name}: option {action.option_strings or action.dest} has no help"
        )


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "build-dataset" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    code = main(
        [
            "train",
            "--dataset",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "m"),
            "--set",
            "train.learning_rate=-1",
        ]
    )
    assert code == 2
    assert "train.learning_rate" in capsys.readouterr().err


def test_build_parser_lists_all_available_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"train", "embed", "evaluate", "demo"}

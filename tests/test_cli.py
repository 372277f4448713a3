"""plumbing/cli.py: the flags of a dataclass and back, settings checked before any work, one-line errors."""

import argparse

import pytest

import train_value
from control import ControlConfig
from generate import SamplingConfig, control_from_args, script_parser
from plumbing.cli import add_config_arguments, config_from_args, run_cli
from train_value import TrainingConfig
from value import ValueConfig


def test_a_dataclass_goes_to_flags_and_back():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainingConfig())
    assert config_from_args(TrainingConfig, parser.parse_args([])) == TrainingConfig()
    args = parser.parse_args(["--lam", "0", "--no-stop-gradient", "--train-batch-size", "8", "--method", "official"])
    assert config_from_args(TrainingConfig, args) == TrainingConfig(
        lam=0.0, stop_gradient=False, batch_size=8, method="official")
    assert "hold the TD(lambda) targets fixed" in parser.format_help()  # the help is the field's own doc


def test_library_errors_name_settings_and_the_command_line_names_flags():
    with pytest.raises(ValueError, match="^n_hidden must be a whole number >= 0, got -1$"):
        ValueConfig(n_embd=4, n_hidden=-1)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ValueConfig)  # the declared defaults: width 0, the model's width
    assert config_from_args(ValueConfig, parser.parse_args([]), n_embd=48) == ValueConfig(n_embd=48)
    assert config_from_args(ValueConfig, parser.parse_args([]), n_embd=48).width == 48
    with pytest.raises(ValueError, match="^--hidden-layers must be a whole number >= 0, got -1; --activation"):
        config_from_args(ValueConfig, parser.parse_args(["--hidden-layers", "-1", "--activation", "x"]), n_embd=4)
    with pytest.raises(ValueError, match="^step_size must be a number >= 0"):
        ControlConfig(step_size=-1.0)
    args = argparse.Namespace(step_size=-1.0, n_steps=None, radius=None, target="auto", l2=0.0)
    with pytest.raises(ValueError, match="^--step-size must be a number >= 0, got -1.0$"):
        control_from_args(args, {})


def test_sampling_flags_fill_a_sampling_config():
    parser = script_parser("doc", prompts="toy-test", sampling=SamplingConfig(samples_per_prompt=4))
    assert config_from_args(SamplingConfig, parser.parse_args([])) == SamplingConfig(samples_per_prompt=4)
    args = parser.parse_args(["--top-p", "0.9", "--stop", "Human:", "--max-new-tokens", "16"])
    assert config_from_args(SamplingConfig, args) == SamplingConfig(max_new_tokens=16, top_p=0.9, stop=("Human:",),
                                                            samples_per_prompt=4)


@pytest.mark.parametrize("flags, message", [(["--lam", "2"], "--lam must be in [0, 1], got 2.0"),
                                            (["--method", "mc"], "--method must be"),
                                            (["--kl-budget", "0"], "--kl-budget must be a number > 0")])
def test_train_value_refuses_bad_settings_before_any_work(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(train_value.worlds, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        train_value.main(flags)
    assert message in capsys.readouterr().err


def test_run_cli_turns_input_errors_into_one_line():
    def broken():
        raise ValueError("unknown reward 'nice'; use one of toy, sentiment")
    with pytest.raises(SystemExit, match="error: unknown reward 'nice'"):
        run_cli(broken)

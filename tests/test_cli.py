"""cli.py: the flags of a dataclass and back, settings checked before any work, one-line errors."""

import argparse

import pytest

import train_value
from cli import add_config_arguments, config_from_args, run_cli, script_parser
from generate import SamplingConfig
from train_value import TRAINING_FLAGS, TRAINING_HELP, TrainingConfig


def test_a_dataclass_goes_to_flags_and_back():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainingConfig(), TRAINING_HELP, TRAINING_FLAGS)
    assert config_from_args(TrainingConfig, parser.parse_args([]), TRAINING_FLAGS) == TrainingConfig()
    args = parser.parse_args(["--lam", "0", "--no-stop-gradient", "--train-batch-size", "8", "--method", "official"])
    assert config_from_args(TrainingConfig, args, TRAINING_FLAGS) == TrainingConfig(
        lam=0.0, stop_gradient=False, batch_size=8, method="official")


def test_sampling_flags_fill_a_sampling_config():
    parser = script_parser("doc", prompts="toy-test", sampling=SamplingConfig(samples_per_prompt=4))
    assert SamplingConfig.from_args(parser.parse_args([])) == SamplingConfig(samples_per_prompt=4)
    args = parser.parse_args(["--top-p", "0.9", "--stop", "Human:", "--max-new-tokens", "16"])
    assert SamplingConfig.from_args(args) == SamplingConfig(max_new_tokens=16, top_p=0.9, stop=("Human:",),
                                                            samples_per_prompt=4)


@pytest.mark.parametrize("flags, message", [(["--lam", "2"], "--lam must be in [0, 1], got 2.0"),
                                            (["--method", "mc"], "--method must be"),
                                            (["--kl-budget", "0"], "--kl-budget must be a number > 0")])
def test_train_value_refuses_bad_settings_before_any_work(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(train_value, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        train_value.main(flags)
    assert message in capsys.readouterr().err


def test_run_cli_turns_input_errors_into_one_line():
    def broken():
        raise ValueError("unknown reward 'nice'; use one of toy, sentiment")
    with pytest.raises(SystemExit, match="error: unknown reward 'nice'"):
        run_cli(broken)

"""
The tiny toy world the tests load, so that no test pretrains a model: a 2-layer base model pretrained on the toy
language (fixtures/base) and its value function, trained and calibrated by train_value.build_value
(fixtures/value.pt and fixtures/value_history.json). About 550 KB in all.

    python tests/make_fixtures.py      # about 2 minutes on 2 CPU cores; rewrites the committed files

The slow end-to-end test runs the same function into a temporary folder and checks that its V steers.
"""

import argparse
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from worlds import toy  # noqa: E402
from generate import SamplingConfig  # noqa: E402
from worlds import load_model  # noqa: E402
from train_value import CalibrationConfig, TrainingConfig, build_value  # noqa: E402
from value import ValueConfig  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PRETRAIN = toy.PretrainConfig(n_layer=2, n_head=2, n_embd=64, documents=10000, steps=2000, batch_size=48, lr=5e-3)
ROLLOUTS = SamplingConfig(max_new_tokens=32, samples_per_prompt=32)  # otherwise train_value.py's defaults
TRAINING = TrainingConfig(epochs=60)


def make(out_dir, log=print):
    """Pretrain the base model into out_dir/base and train its V into out_dir/value.pt; returns the two paths."""
    toy.base_model(out_dir, pretrain_config=PRETRAIN, log=log)
    folder, value = os.path.join(out_dir, "base"), os.path.join(out_dir, "value.pt")
    model, enc = load_model(folder)
    with tempfile.TemporaryDirectory() as rollouts:  # 6 MB of states: made again by the tests that need them
        build_value(model, enc, toy.World().train_prompts(), "toy", value, rollouts, ROLLOUTS,
                    ValueConfig(n_embd=PRETRAIN.n_embd), TRAINING, CalibrationConfig(), "tests/fixtures/base", log=log)
    return folder, value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=FIXTURES, help="where base/, value.pt and value_history.json go")
    args = parser.parse_args(argv)
    shutil.rmtree(os.path.join(args.out_dir, "base"), ignore_errors=True)  # base_model would reuse it otherwise
    make(args.out_dir)


if __name__ == "__main__":
    main()

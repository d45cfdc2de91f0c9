"""The trainer's step, cut into stages, computes what it computed before.

`data/train_step_golden.json` was recorded from `Trainer.train_step` at commit dee9b68,
before the step was cut into stages (rollfleet.methods) and before mini-batches, epochs
and advantage weights existed: on the seeded synthetic batch of step 0 (4 groups of 4,
random behaviour log-probs, so ratios are far from 1 and clipping is active), for four
estimator / loss / aggregation combinations, the loss, the loss's statistics, the
gradient norm before clipping and, per parameter, the clipped gradient's sum and norm and
8 seeded entries. With the defaults (one update per batch, no method, top-p 1) the
staged step must reproduce all of them; with `trainer.skipZeroAdvantage` (on by default)
it leaves the batch's groups scored alike out of the forward and backward, and must
still reproduce the loss, the gradients and their norm (the loss's own statistics then
cover the rows it computed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.spec import parse_manifest
from rollfleet_trainer.loop import Trainer
from rollfleet_trainer.synthetic import synthetic_groups

GOLDEN = json.loads((Path(__file__).parent / "data" / "train_step_golden.json").read_text())


LOSS_STATISTICS = {"clip_fraction", "approx_kl", "ratio_mean"}


@pytest.mark.parametrize("skip", [False, True], ids=["every-group", "skip-zero-advantage"])
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_staged_step_reproduces_the_recorded_step(name, skip, tiny_model_dir, tmp_path):
    recorded = GOLDEN[name]
    job = parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "golden"},
            "spec": {
                "trainer": {"steps": 10, "promptsPerStep": 4, "skipZeroAdvantage": skip},
                "rollout": {"sampling": {"groupSize": 4}},
                # recorded when grpo and reinforce++ added 1e-6 to the std (now 1e-4, TRL's)
                "algorithm": {
                    "learningRate": 1e-2,
                    "advantageEpsilon": 1e-6,
                    **recorded["algorithm"],
                },
            },
        }
    )
    torch.manual_seed(0)
    trainer = Trainer(job, None, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer.set_model(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    groups = synthetic_groups(0, 4, 4, model.config.vocab_size)
    flat = [g for g in groups if len({g.samples[i][0].reward for i in range(g.size)}) == 1]
    assert len(flat) == 2  # two of its four groups were scored alike: `skip` leaves them out
    stats = trainer.train_step(groups)
    for key, value in recorded["stats"].items():
        if skip and key in LOSS_STATISTICS:
            continue
        assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for pname, parameter in model.named_parameters():
        want = recorded["grads"][pname]
        flat = parameter.grad.flatten()
        assert float(flat.double().sum()) == pytest.approx(want["sum"], rel=1e-4, abs=1e-6), pname
        assert float(flat.double().norm()) == pytest.approx(want["norm"], rel=1e-5), pname
        got = flat[torch.tensor(want["index"])].tolist()
        assert got == pytest.approx(want["values"], rel=1e-4, abs=1e-7), pname

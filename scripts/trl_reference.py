"""Record what TRL's GRPOTrainer computes on one fixed batch: the reference for rollfleet's step.

    .venv/bin/python scripts/trl_reference.py            # needs TRL: `make .venv/.bench-installed`
    .venv/bin/python scripts/trl_reference.py --out PATH  # default tests/unit/data/trl_reference.json

Builds one deterministic batch and runs TRL 1.16's own GRPOTrainer code on it, on the CPU in
float32, then writes what TRL computed to tests/unit/data/trl_reference.json (read by a unit
test that needs no TRL):

- the batch: the builtin tiny Llama (`create_tiny_model(tmp, seed=0)`, its defaults), the
  countdown train prompts 0..3 tokenised as rollfleet's workers do (`<bos>` + prompt),
  8 completions per prompt sampled from that model at temperature 1 with a fixed torch seed,
  at most 12 new tokens (some end with `<eos>`, some are cut at 12), and fixed 0/1 rewards
  (one group all equal, so its advantages are 0; the others mixed);
- TRL's side: a GRPOTrainer (loss_type "dapo", beta 0, epsilon 0.2, lr 4e-4 linear, grad norm
  clipped at 1, one iteration, the settings of benchmarks/trl_compare.py) whose `rollout_func`
  returns exactly these completions, and whose reward function returns these rewards; one
  step of `trainer.train()` (its dataloader, `_generate_and_score_completions`, `compute_loss`,
  backward, `_clip_grad_norm`, AdamW step at the scheduler's step-0 rate), observed by
  wrapping those methods on the instance, not by re-doing TRL's math;
- recorded: TRL's advantages, completion mask, per-token log-probs of the completion tokens,
  loss, the gradient's total norm before clipping, each parameter's gradient norm and sum,
  the whole gradient and update (after - before) of two small tensors and 20 seeded entries
  of every other tensor, the learning rate and the optimizer's settings.

The first AdamW step moves every weight by about lr·sign(grad) (Adam's m/sqrt(v) is g/|g|), so
the update hardly depends on the gradient's scale: a test should compare the loss and the
gradient, with the update as a check of the rate and of the optimizer.

Deterministic on one thread; re-running it with other torch/transformers versions can sample
other completions (the JSON holds the batch, so a test reads it from there).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

OUT = ROOT / "tests" / "unit" / "data" / "trl_reference.json"
PROMPTS, GROUP, MAX_NEW, STEPS = 4, 8, 12, 250
SAMPLE_SEED = 1234  # first torch seed tried for the completions (see sample_completions)
REWARD_SEED = 7
ZERO_GROUP = 2  # this group's rewards are all equal (advantages 0)
SMALL = ("model.norm.weight", "model.layers.0.input_layernorm.weight")  # recorded in full
ENTRIES = 20  # seeded entries recorded of every other tensor

SETTINGS = dict(
    use_cpu=True,
    bf16=False,
    fp16=False,
    use_vllm=False,
    activation_checkpointing=False,  # TRL turns it on by default (as gradient_checkpointing)
    gradient_checkpointing=False,
    seed=0,
    max_steps=STEPS,
    per_device_train_batch_size=PROMPTS * GROUP,
    gradient_accumulation_steps=1,
    num_generations=GROUP,
    max_completion_length=MAX_NEW,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    shuffle_dataset=False,
    learning_rate=4e-4,
    lr_scheduler_type="linear",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    beta=0.0,
    epsilon=0.2,
    num_iterations=1,
    loss_type="dapo",
    scale_rewards="group",
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    dataloader_num_workers=0,
)


# --- the batch ---------------------------------------------------------------------------------
def prompt_ids(tokenizer) -> tuple[list[str], list[list[int]]]:
    """Countdown train prompts 0..3 and their ids as rollfleet's workers build them."""
    from rollfleet.tasks import make_task

    task = make_task("countdown", {}, 0)
    texts = [task.example("train", i).prompt for i in range(PROMPTS)]
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)] for t in texts]
    return texts, ids


@torch.no_grad()
def sample_group(model, prompt: list[int], eos: int, generator) -> list[list[int]]:
    """GROUP completions of one prompt from the model, temperature 1, plain multinomial."""
    done: list[list[int] | None] = [None] * GROUP
    rows = [list(prompt) for _ in range(GROUP)]
    for _ in range(MAX_NEW):
        logits = model(input_ids=torch.tensor(rows)).logits[:, -1].float()
        tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        for i, token in enumerate(tokens.tolist()):
            rows[i].append(token)
            if done[i] is None and token == eos:
                done[i] = rows[i][len(prompt) :]
    return [
        d if d is not None else r[len(prompt) : len(prompt) + MAX_NEW]
        for d, r in zip(done, rows, strict=True)
    ]


def sample_completions(model, prompts: list[list[int]], eos: int) -> tuple[int, list[list[int]]]:
    """Completions of every prompt; the first seed from SAMPLE_SEED giving at least 4 that end
    with <eos> (one of them of length < 12) and at least 4 cut at 12 tokens."""
    model.eval()
    for seed in range(SAMPLE_SEED, SAMPLE_SEED + 100):
        generator = torch.Generator().manual_seed(seed)
        completions = [c for p in prompts for c in sample_group(model, p, eos, generator)]
        ended = [c for c in completions if c[-1] == eos]
        cut = [c for c in completions if c[-1] != eos]
        if len(ended) >= 4 and len(cut) >= 4 and any(len(c) < MAX_NEW for c in ended):
            return seed, completions
    raise RuntimeError("no seed gave both <eos>-ended and truncated completions")


def fixed_rewards() -> list[float]:
    """Seeded 0/1 rewards: group ZERO_GROUP all 1, every other group mixed."""
    rng = random.Random(REWARD_SEED)
    rewards = []
    for g in range(PROMPTS):
        while True:
            group = [float(rng.random() < 0.4) for _ in range(GROUP)]
            if g == ZERO_GROUP:
                group = [1.0] * GROUP
            if g == ZERO_GROUP or 0 < sum(group) < GROUP:
                break
        rewards += group
    return rewards


# --- TRL ---------------------------------------------------------------------------------------
def run_trl(folder: Path, prompt_texts, prompts, completions, rewards, out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [{"prompt": tokenizer.bos_token + t, "index": i} for i, t in enumerate(prompt_texts)]
    by_text = {r["prompt"]: r["index"] for r in rows}

    def rollout_func(batch_prompts, trainer):
        """TRL's hook for custom generation: our prompts' completions, in TRL's row order."""
        seen: dict[int, int] = {}
        order = []
        for text in batch_prompts:
            p = by_text[text]
            order.append(p * GROUP + seen.get(p, 0))
            seen[p] = seen.get(p, 0) + 1
        assert sorted(order) == list(range(PROMPTS * GROUP)), order
        return {
            "prompt_ids": [prompts[i // GROUP] for i in order],
            "completion_ids": [completions[i] for i in order],
            "logprobs": None,
            "sample": order,
            "fixed_reward": [rewards[i] for i in order],
        }

    def fixed_reward(completions, fixed_reward, **_):
        return list(fixed_reward)

    captured: dict = {}

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            captured["lr"] = [g["lr"] for g in trainer.optimizer.param_groups]

        def on_step_end(self, args, state, control, **kwargs):
            # TRL's own metrics of the step (its log() clears them right after this)
            captured["metrics"] = {
                k: v[-1] for k, v in trainer._metrics["train"].items() if v and k != "step_time"
            }
            control.should_training_stop = True  # one optimizer step of the 250-step schedule

    args = GRPOConfig(output_dir=str(out_dir), **SETTINGS)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=fixed_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Probe()],
        rollout_func=rollout_func,
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)

    # Observe TRL's own methods on this instance (each calls the original).
    generate = trainer._generate_and_score_completions
    compute_loss = trainer.compute_loss
    logps_fn = trainer._get_per_token_logps_and_entropies
    clip = trainer._clip_grad_norm

    def generate_probe(inputs):
        out = generate(inputs)
        captured["generated"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}
        captured["order"] = [x["sample"] for x in inputs]
        return out

    def compute_loss_probe(model, inputs, *a, **k):
        loss = compute_loss(model, inputs, *a, **k)
        captured["loss_inputs"] = {
            k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()
        }
        captured["loss"] = loss.item()
        return loss

    def logps_probe(*a, **k):
        out = logps_fn(*a, **k)
        if torch.is_grad_enabled():
            captured["logps"] = out[0].detach().clone()
        return out

    def clip_probe(model):
        captured["grads"] = {
            n: p.grad.detach().clone()
            for n, p in trainer.model.named_parameters()
            if p.grad is not None
        }
        norm = clip(model)
        captured["grad_norm"] = float(norm)
        return norm

    trainer._generate_and_score_completions = generate_probe
    trainer.compute_loss = compute_loss_probe
    trainer._get_per_token_logps_and_entropies = logps_probe
    trainer._clip_grad_norm = clip_probe

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    captured["before"], captured["after"] = before, after
    opt = trainer.optimizer
    captured["optimizer"] = {
        "class": type(getattr(opt, "optimizer", opt)).__name__,
        **{
            k: v
            for k, v in opt.param_groups[0].items()
            if k in ("betas", "eps", "weight_decay", "amsgrad", "fused", "foreach", "maximize")
        },
        "trainer_optim": str(trainer.args.optim),
    }
    captured["eos_token_ids"] = list(trainer.eos_token_ids)
    return captured


# --- record ------------------------------------------------------------------------------------
def unshuffle(rows_in_batch_order: list[int], gen: dict, loss_inputs: dict) -> list[int]:
    """For each sample, the row of compute_loss's (shuffled) inputs that holds it."""

    def key(d: dict, r: int) -> tuple:
        return tuple(d["prompt_ids"][r].tolist()), tuple(d["completion_ids"][r].tolist())

    free: dict = {}
    for r in range(loss_inputs["completion_ids"].shape[0]):
        free.setdefault(key(loss_inputs, r), []).append(r)
    rows = [0] * len(rows_in_batch_order)
    for r, sample in enumerate(rows_in_batch_order):
        rows[sample] = free[key(gen, r)].pop(0)  # equal rows hold equal values
    return rows


def record(batch: dict, cap: dict) -> dict:
    import transformers
    import trl

    n = PROMPTS * GROUP
    order = cap["order"]  # generated row r holds sample order[r]
    gen_row = [0] * n
    for r, s in enumerate(order):
        gen_row[s] = r
    gen = cap["generated"]
    loss_row = unshuffle(order, gen, cap["loss_inputs"])
    lengths = [len(c) for c in batch["completion_ids"]]
    mask = gen["completion_mask"]
    logps = cap["logps"]
    rng = random.Random(0)
    params = {}
    for name, before in cap["before"].items():
        grad = cap["grads"].get(name, torch.zeros_like(before)).double()
        update = (cap["after"][name] - before).double()
        entry = {
            "shape": list(before.shape),
            "grad_norm": grad.norm().item(),
            "grad_sum": grad.sum().item(),
            "update_norm": update.norm().item(),
        }
        flat_g, flat_u = grad.flatten(), update.flatten()
        if name in SMALL:
            entry.update(grad=flat_g.tolist(), update=flat_u.tolist())
        else:
            idx = sorted(rng.sample(range(before.numel()), ENTRIES))
            entry.update(indices=idx, grad=flat_g[idx].tolist(), update=flat_u[idx].tolist())
        params[name] = entry
    return {
        "about": "TRL GRPOTrainer's computation on one fixed batch (scripts/trl_reference.py)",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "settings": {k: v for k, v in SETTINGS.items() if k not in ("disable_tqdm", "report_to")},
        "model": {"builder": "rollfleet.models.tiny.create_tiny_model", "seed": 0},
        "batch": {
            **batch,
            "truncated": [c[-1] not in cap["eos_token_ids"] for c in batch["completion_ids"]],
            "zero_advantage_group": ZERO_GROUP,
        },
        "advantages": [gen["advantages"][gen_row[s]].item() for s in range(n)],
        # Row s: sample s; column t: completion token t (padded to the longest, 12).
        "completion_mask": [mask[gen_row[s]].tolist() for s in range(n)],
        "logprobs": [
            [round(x, 7) for x in logps[loss_row[s], : lengths[s]].tolist()] for s in range(n)
        ],
        "num_items_in_batch": int(gen["num_items_in_batch"]),
        "loss": cap["loss"],
        "grad_norm_before_clip": cap["grad_norm"],
        "learning_rate": cap["lr"][0],
        "optimizer": cap["optimizer"],
        "metrics": cap["metrics"],
        "params": params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollfleet.models.tiny import create_tiny_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="trl-ref-") as tmp:
        folder = create_tiny_model(Path(tmp) / "model", seed=0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts, prompts = prompt_ids(tokenizer)
        seed, completions = sample_completions(model, prompts, tokenizer.eos_token_id)
        rewards = fixed_rewards()
        batch = {
            "prompts": texts,
            "prompt_ids": prompts,
            "completion_ids": completions,
            "rewards": rewards,
            "sample_seed": seed,
            "group_size": GROUP,
        }
        del model
        cap = run_trl(folder, texts, prompts, completions, rewards, Path(tmp) / "trl")
    data = record(batch, cap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"wrote {args.out} ({args.out.stat().st_size // 1024} KB): loss {data['loss']:.6g}, "
        f"grad norm {data['grad_norm_before_clip']:.6g}, lr {data['learning_rate']:.3g}, "
        f"{sum(data['batch']['truncated'])}/32 truncated"
    )


if __name__ == "__main__":
    main()

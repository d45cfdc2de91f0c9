"""RAVR (rollfleet.methods.ravr): the exact identities on an enumerable latent space, the
advantages on hand-computed values, the prompts a group samples under, and a non-zero
gradient where GRPO's is zero."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollfleet.episodes import EpisodeRequest
from rollfleet.methods import Stages
from rollfleet.methods.ravr.stages import PosteriorTask, _before_answer
from rollfleet.methods.ravr.utility import (
    bayes_posterior,
    continuation_logprobs,
    elbo,
    log_marginal,
    ravr_advantages,
)
from rollfleet.models.tokenizer import build_char_tokenizer
from rollfleet.protocol import (
    Conditioning,
    RavrSample,
    RolloutTask,
    Trajectory,
    TrajectoryStatus,
)
from rollfleet.rewards import score
from rollfleet.spec import parse_manifest
from rollfleet.tasks import make_task
from rollfleet.tasks.solve import equation, solution
from rollfleet_trainer.loop import Trainer
from rollfleet_trainer.synthetic import synthetic_groups


def job(group: int = 4, posterior: int | None = 2, **algorithm):
    """A solve job with RAVR (`posterior` samples of each group), or plain GRPO (None)."""
    return parse_manifest(
        {
            "apiVersion": "rollfleet.io/v1alpha1",
            "kind": "RLJob",
            "metadata": {"name": "ravr"},
            "spec": {
                "task": {"name": "solve"},
                "trainer": {"steps": 10, "promptsPerStep": 4},
                "rollout": {"sampling": {"groupSize": group}},
                "algorithm": {"learningRate": 1e-2, **algorithm},
                "methods": {} if posterior is None else {"ravr": {"posteriorSamples": posterior}},
            },
        }
    )


# --- the task -------------------------------------------------------------------------
def test_solve_writes_the_undo_chain_ending_at_x():
    ops = [("+", 4), ("*", 3)]
    assert equation("x", ops, 39) == "(x+4)*3=39"
    assert solution(9, ops) == "39/3=13,13-4=9"
    example = make_task("solve", {"steps": 3}).example("train", 0)
    x, chain = int(example.answer), example.demonstration[0][1]
    assert chain.split("=")[-1] == str(x)
    value = x  # the prompt's equation holds for the answer
    for op, k in example.meta["ops"]:
        value = value + k if op == "+" else value - k if op == "-" else value * k
    assert value == example.meta["result"]


def test_solve_reward_reads_the_last_steps_result():
    assert score("solve", {"response": "39/3=13,13-4=9", "answer": "9", "meta": {}}) == 1.0
    assert score("solve", {"response": "39/3=13,13-4=8", "answer": "9", "meta": {}}) == 0.0
    assert score("solve", {"response": "9", "answer": "9", "meta": {}}) == 1.0
    assert score("solve", {"response": "", "answer": "9", "meta": {}}) == 0.0


def test_the_answer_is_scored_where_the_trace_states_it():
    tok = build_char_tokenizer()
    ids = [*tok.encode("39/3=13,13-4=9", add_special_tokens=False), tok.eos_token_id]
    sample = RavrSample(
        posterior=False,
        question_ids=[tok.bos_token_id],
        cue_ids=tok.encode("=", add_special_tokens=False),
        reference_ids=tok.encode("9", add_special_tokens=False),
    )
    traj = Trajectory(
        task_id="t",
        group_id="g",
        sample_index=0,
        group_size=1,
        worker="w",
        status=TrajectoryStatus.COMPLETED,
        prompt_ids=[tok.bos_token_id],
        response_ids=ids,
        behaviour_logprobs=[0.0] * len(ids),
        token_versions=[0] * len(ids),
        loss_mask=[1.0] * len(ids),
        conditioning=Conditioning(ravr=sample),
    )
    assert tok.decode(_before_answer(traj)) == "39/3=13,13-4="
    no_cue = traj.model_copy(update={"response_ids": tok.encode("13", add_special_tokens=False)})
    no_cue.status = TrajectoryStatus.TRUNCATED
    assert tok.decode(_before_answer(no_cue)) == "13="


# --- the exact identities, by enumeration ------------------------------------------------
def exact_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Σ log p(continuation | context) from one unbatched forward, summed by hand."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(context) + i - 1, token]) for i, token in enumerate(continuation))


def test_marginal_and_elbo_equal_exact_enumeration(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    x = [tok.bos_token_id, *tok.encode("x+4=9:", add_special_tokens=False)]
    cue, answer = (
        tok.encode("=", add_special_tokens=False),
        tok.encode("5", add_special_tokens=False),
    )
    latents = [[z] for z in range(model.config.vocab_size)]  # every one-token trace
    prior = continuation_logprobs(model, [(x, z) for z in latents], tok.pad_token_id, mean=False)
    log_s = continuation_logprobs(
        model, [(x + z + cue, answer) for z in latents], tok.pad_token_id, mean=False
    )
    exact_prior = torch.tensor([exact_logprob(model, x, z) for z in latents], dtype=torch.float64)
    exact_s = torch.tensor(
        [exact_logprob(model, x + z + cue, answer) for z in latents], dtype=torch.float64
    )
    torch.testing.assert_close(prior.double(), exact_prior, rtol=0, atol=1e-6)
    assert abs(float(torch.logsumexp(exact_prior, 0))) < 1e-6  # the traces are all of them
    # log π(y*|x) = log Σ_z π(z|x) s(z)
    exact_marginal = float(torch.logsumexp(exact_prior + exact_s, 0))
    assert abs(float(log_marginal(prior, log_s)) - exact_marginal) < 1e-6
    # The ELBO is tight at the Bayes posterior and below it elsewhere.
    posterior = bayes_posterior(prior, log_s)
    assert abs(float(posterior.exp().sum()) - 1) < 1e-6
    assert abs(float(elbo(posterior, prior, log_s)) - exact_marginal) < 1e-6
    exact_elbo_at_prior = float((exact_prior.exp() * exact_s).sum())  # KL(π ‖ π) = 0
    assert abs(float(elbo(prior, prior, log_s)) - exact_elbo_at_prior) < 1e-6
    assert exact_elbo_at_prior < exact_marginal - 1e-5  # Jensen: strictly below, s varies
    # Under the posterior the expected utility is μ + Var_π(s) / μ ≥ μ.
    s, p = exact_s.exp(), exact_prior.exp()
    mu = float((p * s).sum())
    variance = float((p * (s - mu) ** 2).sum())
    assert abs(float((posterior.exp() * log_s.exp()).sum()) - (mu + variance / mu)) < 1e-6


# --- advantages ------------------------------------------------------------------------
def grpo(rewards: torch.Tensor) -> torch.Tensor:
    mean, std = rewards.mean(-1, keepdim=True), rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + 1e-4)


def test_advantages_on_hand_computed_values():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # posterior samples first: they saw y*
    utilities = torch.tensor([[0.9, 0.5, 0.2, 0.4]])
    posterior = torch.tensor([[True, True, False, False]])
    advantages, pull = ravr_advantages(rewards, utilities, posterior, grpo, pull_weight=0.5)
    half = 1 / (2**0.5 + 1e-4 * 2)  # GRPO over the prior pair (1, 0): ±0.5 / (std + eps)
    expected = torch.tensor([[0.9 - 0.3, 0.5 - 0.3, half, -half]])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pull, torch.tensor([[0.45, 0.25]]))


# --- the prompts a group samples under ---------------------------------------------------
def test_posterior_samples_see_the_answer_and_prior_samples_never_do():
    tok = build_char_tokenizer()
    stages = Stages.for_spec(job(group=4, posterior=2).spec)
    example = make_task("solve").example("train", 3)
    task = RolloutTask.for_example(example, index=3, group_id="g3", samples=4)
    question = [tok.bos_token_id, *tok.encode(example.prompt, add_special_tokens=False)]
    for sample in (None, 0, 1, 2, 3):  # None: held-out evaluation, sampled as deployed
        request = stages.build_request(task, EpisodeRequest(list(question), sample=sample), tok)
        ravr = request.conditioning.ravr
        assert ravr.question_ids == question
        assert tok.decode(ravr.reference_ids) == example.answer
        if sample is not None and sample < 2:
            assert ravr.posterior
            assert tok.decode(request.prompt_ids[1:]) == f"[{example.answer}]{example.prompt}"
        else:
            assert not ravr.posterior and request.prompt_ids == question


def test_the_posterior_warmup_shows_the_same_demonstrations_behind_the_answer():
    task = make_task("solve")
    shown = PosteriorTask(task, "[{answer}]{question}").example("train", 7)
    plain = task.example("train", 7)
    assert shown.prompt == f"[{plain.answer}]{plain.prompt}"
    assert shown.demonstration == plain.demonstration and shown.answer == plain.answer


# --- a learning signal where GRPO has none -----------------------------------------------
def failing_groups(vocab: int, posterior: int):
    """Synthetic groups whose prior samples all fail: GRPO's advantages are all zero."""
    groups = synthetic_groups(0, 4, 4, vocab)
    for g in groups:
        for i, (t, _) in g.samples.items():
            t.reward = 1.0 if i < posterior else 0.0
            t.conditioning.ravr = RavrSample(
                posterior=i < posterior,
                question_ids=t.prompt_ids,
                cue_ids=[5],
                reference_ids=[7, 8],
            )
            if i < posterior:  # sampled under a longer, answer-bearing prompt
                t.prompt_ids = [*t.prompt_ids, 9, 10]
    return groups


def step(spec, model_dir, run_dir, groups):
    trainer = Trainer(spec, None, run_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer.set_model(model, AutoTokenizer.from_pretrained(model_dir))
    stats = trainer.train_step(groups)
    grad = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    return stats, float(grad)


def test_a_group_whose_prior_samples_all_fail_still_trains(tiny_model_dir, tmp_path):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    stats, grad = step(job(), tiny_model_dir, tmp_path / "ravr", failing_groups(vocab, 2))
    assert stats["ravr_zero_advantage_groups"] == 1.0
    assert grad > 1e-4
    assert 0 < stats["ravr_utility_prior"] < 1 and 0 < stats["ravr_utility_posterior"] < 1
    # Plain GRPO on the prior samples alone: every advantage 0, no gradient.
    groups = failing_groups(vocab, 2)
    for g in groups:  # keep the two prior samples, renumbered as a group of two
        kept = [g.samples[i][0] for i in (2, 3)]
        g.size, g.samples = 2, {}
        for i, t in enumerate(kept):
            t.sample_index, t.group_size, t.conditioning.ravr = i, 2, None
            g.samples[i] = (t, None)
    _, zero = step(job(group=2, posterior=None), tiny_model_dir, tmp_path / "grpo", groups)
    assert zero == 0.0

"""NEZHA against autoregressive beam search on the same model (arXiv 2511.18793's claims).

    make bench-nezha
    .venv/bin/python benchmarks/nezha.py [--users 1000] [--latency-users 100] [--rl-steps 100]

1. Warm-up, by the trainer's own code (examples/nezha.yaml): backbone and draft head
   trained together on next-item demonstrations (the answer's text loss plus the head's
   teacher-forced loss). One model serves both decoders.
2. On `--users` held-out users, top-10 recommendations of each decoder:
   - beam: autoregressive beam search over the backbone's language-model head: a prefill
     of the prompt, then one forward per further level over every beam, on the KV cache,
     each level restricted to the codes the verifier allows (constrained beam search, as
     generative recommenders decode);
   - nezha: one backbone forward, then beam search over the draft head with the verifier
     (rollfleet.models.nezha.draft_search, what the torch engine runs).
   HR@10 and NDCG@10 at beams 10 and 50; the share of invalid items in the draft head's
   top 10 without the verifier and with it.
3. Latency of one request (a user at a time, one thread, as a recommender serves): the
   median over `--latency-users` users, both decoders alternating, beams 10 and 50.
4. RL (`rollfleet run` of the example from the warm-up, `--rl-steps` steps, asynchronous):
   held-out next-item hit rate before and after, and NEZHA's HR@10 after.

Claims to test: HR@10 within 3 % of beam search; at least 2x faster at beam >= 50; 0
invalid with the verifier (the paper: the valid share of drafts 43 % -> 93 %).

Ends with `nezha hr@10 beam=<a> nezha=<b> invalid without_verifier=<share>
with_verifier=<share> speedup=<x>x` (beam 50; speedup = beam search's median latency over
NEZHA's).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import example, from_model, load_model, machine, quiet, run_job, single_thread, warm_up

from rollfleet.models.nezha import backbone_states, draft_search, masked_logprobs
from rollfleet.tasks import make_task
from rollfleet.tasks.recommend import hit_rate, item_text, ndcg, verifier_for

BEAMS = (10, 50)


@torch.no_grad()
def beam_search(model, prompts: list[list[int]], beam: int, allowed):
    """Autoregressive constrained beam search over the language-model head: items [N, K, L]
    best first. The prompts have one length (histories of a fixed number of items)."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("beam_search: the prompts must have one length")
    codes = torch.tensor(model.config.draft_code_token_ids)
    levels, width = model.config.draft_levels, len(codes)
    n = len(prompts)
    out = model(input_ids=torch.tensor(prompts), use_cache=True)
    cache, logits = out.cache, out.logits[:, -1, codes]
    prefixes = torch.zeros(n, 1, 0, dtype=torch.long)
    scores = torch.zeros(n, 1)
    for level in range(levels):
        beams = prefixes.shape[1]
        mask = allowed(prefixes.reshape(n * beams, level), width).view(n, beams, width)
        total = (scores[..., None] + masked_logprobs(logits.view(n, beams, width), mask)).view(
            n, -1
        )
        scores, index = total.topk(min(beam, total.shape[1]), dim=-1)
        origin, code = index // width, index % width
        prefixes = torch.cat(
            [prefixes.gather(1, origin[..., None].expand(-1, -1, level)), code[..., None]], -1
        )
        if level + 1 < levels:  # one forward over every beam for the next level
            cache.reorder_cache((torch.arange(n)[:, None] * beams + origin).view(-1))
            out = model(input_ids=codes[code].view(-1, 1), cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1, codes]
    return prefixes


@torch.no_grad()
def nezha_search(model, prompts: list[list[int]], beam: int, allowed):
    h0, h_sp = backbone_states(model, prompts)
    return draft_search(model.draft, h0, h_sp, beam=beam, allowed=allowed)[0]


def ranked(items: torch.Tensor) -> list[list[str]]:
    return [[item_text(tuple(i)) for i in row] for row in items.tolist()]


def quality(model, prompts, answers, decode, beam, allowed, chunk: int = 100) -> dict:
    lists = []
    for start in range(0, len(prompts), chunk):
        lists += ranked(decode(model, prompts[start : start + chunk], beam, allowed))
    return {
        "hr@10": statistics.mean(hit_rate(r, a, 10) for r, a in zip(lists, answers, strict=True)),
        "ndcg@10": statistics.mean(ndcg(r, a, 10) for r, a in zip(lists, answers, strict=True)),
    }


def latencies(model, prompts, beam, allowed) -> dict[str, float]:
    """Median seconds per single-user request of each decoder, alternating per user."""
    times = {"beam": [], "nezha": []}
    for prompt in prompts:
        for name, decode in (("beam", beam_search), ("nezha", nezha_search)):
            started = time.perf_counter()
            decode(model, [prompt], beam, allowed)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1000, help="held-out users scored")
    parser.add_argument("--latency-users", type=int, default=100)
    parser.add_argument("--rl-steps", type=int, default=100, help="0 skips the RL run")
    args = parser.parse_args()
    quiet()
    job = example("nezha.yaml")
    spec = job["spec"]
    task = make_task("recommend", spec["task"]["params"], spec["seed"])
    verifier = verifier_for(spec["seed"], task.codes, task.items)
    print(f"# NEZHA benchmark on {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-nezha-"))
    started = time.monotonic()
    folder = warm_up(job, tmp / "warmup")
    print(
        f"warm-up (joint SFT, {spec['methods']['nezha']['warmupSteps']} steps): {time.monotonic() - started:.0f} s"
    )
    model, tok = load_model(folder)
    users = [task.example("heldout", i) for i in range(args.users)]
    prompts = [[tok.bos_token_id, *tok.encode(u.prompt, add_special_tokens=False)] for u in users]
    answers = [u.answer for u in users]

    table = {}
    with single_thread():
        for beam in BEAMS:
            table[("beam", beam)] = quality(
                model, prompts, answers, beam_search, beam, verifier.allowed
            )
            table[("nezha", beam)] = quality(
                model, prompts, answers, nezha_search, beam, verifier.allowed
            )
        free = torch.cat(
            [
                nezha_search(model, prompts[s : s + 100], 10, None)
                for s in range(0, len(prompts), 100)
            ]
        )
        checked = torch.cat(
            [
                nezha_search(model, prompts[s : s + 100], 10, verifier.allowed)
                for s in range(0, len(prompts), 100)
            ]
        )
        invalid = {
            name: statistics.mean(not verifier.valid(tuple(i)) for i in items.view(-1, 3).tolist())
            for name, items in (("without", free), ("with", checked))
        }
        latency = {
            beam: latencies(model, prompts[: args.latency_users], beam, verifier.allowed)
            for beam in BEAMS
        }

    print(
        f"\n{args.users} held-out users; latency: median of {args.latency_users} single-user requests, one thread\n"
    )
    print("| decoder | beam | HR@10 | NDCG@10 | latency ms |")
    print("|---|---|---|---|---|")
    for (name, beam), q in table.items():
        print(
            f"| {name} | {beam} | {q['hr@10']:.3f} | {q['ndcg@10']:.3f} | {1000 * latency[beam][name]:.2f} |"
        )
    for beam in BEAMS:
        print(f"speedup at beam {beam}: {latency[beam]['beam'] / latency[beam]['nezha']:.2f}x")
    print(
        f"invalid items in the draft head's top 10: without the verifier {invalid['without']:.3f}, with {invalid['with']:.3f}"
    )

    if args.rl_steps:
        run = run_job(
            from_model(
                job, folder, steps=args.rl_steps, trainer={"steps": args.rl_steps, "evalEvery": 0}
            ),
            tmp / "rl",
        )
        result = run["result"]
        trained, _ = load_model(folder, tmp / "rl")
        with single_thread():
            after = quality(trained, prompts, answers, nezha_search, 50, verifier.allowed)
        print(
            f"\nRL ({args.rl_steps} steps, asynchronous, {run['wall']:.0f} s): held-out next-item "
            f"hit rate of sampled items {result['heldout_before']:.3f} -> "
            f"{result['heldout_after']:.3f}, greedy (beam {spec['methods']['nezha']['beam']}) "
            f"{result['heldout_greedy_before']:.3f} -> {result['heldout_greedy_after']:.3f}; "
            f"NEZHA HR@10 at beam 50 {table[('nezha', 50)]['hr@10']:.3f} -> {after['hr@10']:.3f}"
        )

    speedup = latency[50]["beam"] / latency[50]["nezha"]
    print(
        f"nezha hr@10 beam={table[('beam', 50)]['hr@10']:.3f} nezha={table[('nezha', 50)]['hr@10']:.3f} "
        f"invalid without_verifier={invalid['without']:.3f} with_verifier={invalid['with']:.3f} "
        f"speedup={speedup:.2f}x"
    )


if __name__ == "__main__":
    main()

"""Reasoning Palette's stages: the VAE and the prefix SFT (warmup), the prefixed share of
each group (build_request), the same prefix when the trainer scores a sample
(policy_logprobs), and the mixed group's advantages with the method's figures
(advantages). The VAE lives in the model folder (`palette_vae.safetensors`): the warm-up
writes it, every worker and trainer rank reads it (load_files)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from rollfleet.methods import Method
from rollfleet.methods.palette.vae import (
    PaletteVAE,
    draw_latents,
    pooled_embedding,
    prefixed_samples,
)
from rollfleet.models.batching import TrainBatch, prefix_embeddings, token_logprobs
from rollfleet.protocol import PaletteSample

log = logging.getLogger("trainer")

VAE_FILE = "palette_vae.safetensors"


class Palette(Method):
    name = "palette"
    model_files = (VAE_FILE,)

    def __init__(self, params, spec):
        super().__init__(params, spec)
        self.vae: PaletteVAE | None = None

    def load_files(self, folder) -> None:
        self.vae = PaletteVAE.load(Path(folder) / VAE_FILE)

    @torch.no_grad()
    def prefix(self, latents: torch.Tensor) -> torch.Tensor:
        """The prefix embeddings [L, hidden] that latents [L, latent dim] decode to."""
        if self.vae is None:
            raise RuntimeError("Reasoning Palette's VAE is not loaded (load_files first)")
        return self.vae.decode(latents)

    def latents(self, key: str, rows: int) -> torch.Tensor:
        return draw_latents(f"{self.spec.seed}/{key}", rows, self.params.latentDim)

    # --- rollout side -------------------------------------------------------------------
    def build_request(self, task, request, tokenizer):
        """The first ρ(τ)·n samples of a group get a prefix of `prefixLength` decoded
        latents, in place of as many placeholder tokens in front of the prompt. τ is the
        trainer's progress when it issued the task; held-out samples (no index) get none."""
        if request.sample is None:
            return request
        progress = task.min_version / self.spec.trainer.steps
        if request.sample >= prefixed_samples(self.params.schedule, progress, task.group_size):
            return request
        z = self.latents(f"{task.group_id}/{request.sample}", self.params.prefixLength)
        return self.prefixed(request, z, tokenizer)

    def prefixed(self, request, z: torch.Tensor, tokenizer):
        """`request` behind the prefix that latents z [L, latent dim] decode to: L
        placeholder tokens in front of its prompt, their embeddings replaced, and the
        latents recorded for the trainer."""
        return dataclasses.replace(
            request,
            prompt_ids=[tokenizer.pad_token_id] * len(z) + request.prompt_ids,
            prompt_embeds=self.prefix(z),
            conditioning=request.conditioning.model_copy(
                update={"palette": PaletteSample(latents=z.tolist())}
            ),
        )

    # --- trainer side -------------------------------------------------------------------
    def warmup(self, model, tokenizer, task, folder) -> None:
        from rollfleet.models.warmup import encode_turns, warmup_sft

        p, folder = self.params, Path(folder)
        start = Path(self.spec.model.path) / VAE_FILE if self.spec.model.path else None
        if start is not None and start.is_file():  # the start model is a Palette warm-up's
            log.info("Reasoning Palette: the start model's VAE, no new warm-up")
            shutil.copyfile(start, folder / VAE_FILE)
            self.load_files(folder)
            return
        pairs = [task.example("train", i) for i in range(p.vaeExamples)]
        h = pooled_embedding(
            model,
            [encode_turns(tokenizer, ex.prompt, ex.demonstration)[0][1:-1] for ex in pairs],
        )
        self.vae = PaletteVAE(h.shape[-1], p.latentDim, p.vaeHidden)
        history = self.vae.fit(h, steps=p.vaeSteps, beta=p.beta, seed=self.spec.seed)
        log.info(
            "Reasoning Palette: VAE on %d pairs, %d steps: reconstruction %.3f, KL %.3f",
            len(pairs),
            p.vaeSteps,
            history[-1]["recon"],
            history[-1]["kl"],
        )
        self.vae.save(folder / VAE_FILE)
        if not p.sftSteps:
            return
        prior = torch.Generator().manual_seed(self.spec.seed)

        def prior_prefixes(batch: int) -> torch.Tensor:
            z = torch.randn(batch * p.sftPrefixLength, p.latentDim, generator=prior)
            return self.prefix(z).view(batch, p.sftPrefixLength, -1)

        warm = self.spec.model.warmup
        losses = warmup_sft(
            model,
            tokenizer,
            task,
            steps=p.sftSteps,
            batch_size=warm.batchSize,
            lr=p.sftLearningRate,
            seed=self.spec.seed,
            examples=warm.examples,
            prefixes=prior_prefixes,
        )
        log.info(
            "Reasoning Palette: %d SFT steps with prior prefixes, loss %.3f", p.sftSteps, losses[-1]
        )

    def policy_logprobs(self, model, batch: TrainBatch):
        """The sampling log-probs, each prefixed sample scored behind the prefix it was
        drawn with (decoded again from its latents: the VAE is frozen)."""
        rows = [i for i, t in enumerate(batch.trajectories) if t.conditioning.palette]
        if not rows:
            return None
        prefixes = torch.stack(
            [
                self.prefix(torch.tensor(batch.trajectories[i].conditioning.palette.latents))
                for i in rows
            ]
        )
        sampling = self.spec.rollout.sampling
        with prefix_embeddings(model, torch.tensor(rows), prefixes):
            return token_logprobs(
                model, batch.input_ids, batch.attention_mask, sampling.temperature, sampling.topP
            )

    def advantages(self, model, batch: TrainBatch, rewards, estimate):
        """The job's estimator over each whole group, prefixed and plain samples together
        (the paper's mixed groups); with the share and rewards of each kind as figures."""
        prefixed = torch.tensor([t.conditioning.palette is not None for t in batch.trajectories])
        flat = rewards.reshape(-1).float()
        # Every figure every step (ranks average them by name): NaN where a kind is absent.
        metrics = {
            "palette_prefixed_share": float(prefixed.float().mean()),
            "palette_prefixed_reward": float(flat[prefixed].mean()),
            "palette_plain_reward": float(flat[~prefixed].mean()),
        }
        return estimate(rewards).reshape(-1), metrics

"""Reasoning Palette's math: the pooled embedding, the VAE, latents, prefixes, the schedule.

    h = pooled_embedding(model, ids)                  # mean of E(x_i) over [question; answer]
    vae = PaletteVAE(hidden=h.shape[-1], latent=16, width=256).fit(h, steps, beta, seed)
    z = draw_latents("0/g17/3", rows=8, dim=16)       # the same key gives the same z
    prefix = vae.decode(z)                            # [8, hidden]: the prompt's soft prefix
    prefixed_share("linear", 0.25)                    # 0.75 of each group gets a prefix

The VAE follows the paper's Eqs. 6-8: an MLP encoder to (μ, log σ²), the reparameterised
z, an MLP decoder back to the embedding, loss ‖h − ĥ‖² + β · KL(q(z|h) ‖ N(0, I)). One
choice of ours: it works on h standardised per dimension (the training set's mean and
std, kept as buffers, undone by `decode`). Mean-pooled embeddings of a task's examples
differ from each other by little against their common mean; standardised, the
reconstruction term sees that variation instead of collapsing to the mean.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@torch.no_grad()
def pooled_embedding(model, sequences: list[list[int]]) -> torch.Tensor:
    """[len(sequences), hidden]: the mean of each sequence's input-token embeddings."""
    table = model.get_input_embeddings()
    return torch.stack([table(torch.tensor(ids)).float().mean(0) for ids in sequences])


class PaletteVAE(nn.Module):
    def __init__(self, hidden: int, latent: int, width: int):
        super().__init__()
        self.hidden, self.latent, self.width = hidden, latent, width
        self.encoder = nn.Sequential(
            nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, 2 * latent)
        )
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.GELU(), nn.Linear(width, hidden))
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("std", torch.ones(hidden))

    def encode(self, standardised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z | h), from h standardised."""
        mu, log_var = self.encoder(standardised).chunk(2, dim=-1)
        return mu, log_var

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """ĥ = D(z), in the embedding space (the standardisation undone)."""
        return self.decoder(z) * self.std + self.mean

    def loss(self, h: torch.Tensor, beta: float, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The negative ELBO per example, with `noise` ~ N(0, I) for the reparameterisation;
        the reconstruction is measured in standardised units."""
        target = (h - self.mean) / self.std
        mu, log_var = self.encode(target)
        z = mu + (0.5 * log_var).exp() * noise
        recon = ((self.decoder(z) - target) ** 2).sum(-1).mean()
        kl = (0.5 * (mu**2 + log_var.exp() - 1 - log_var)).sum(-1).mean()
        return recon + beta * kl, {"recon": recon.item(), "kl": kl.item()}

    def fit(
        self, h: torch.Tensor, *, steps: int, beta: float, seed: int, batch: int = 256, lr=1e-3
    ) -> list[dict]:
        """Train on pooled embeddings h [n, hidden]; returns each step's loss terms."""
        gen = torch.Generator().manual_seed(seed)
        self.mean.copy_(h.mean(0))
        self.std.copy_(h.std(0).clamp_min(1e-6))
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(steps):
            pick = torch.randint(len(h), (min(batch, len(h)),), generator=gen)
            noise = torch.randn(len(pick), self.latent, generator=gen)
            loss, terms = self.loss(h[pick], beta, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(terms)
        self.eval()
        return history

    def save(self, path: Path) -> None:
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        shape = {"hidden": self.hidden, "latent": self.latent, "width": self.width}
        save_file(state, str(path), metadata={"shape": json.dumps(shape)})

    @classmethod
    def load(cls, path: Path) -> PaletteVAE:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            shape = json.loads(f.metadata()["shape"])
        vae = cls(**shape)
        vae.load_state_dict(load_file(str(path)))
        return vae.eval()


def draw_latents(key: str, rows: int, dim: int) -> torch.Tensor:
    """[rows, dim] standard normal latents, a function of `key` alone (a sample's job seed,
    group and index), so a latent can be drawn again anywhere."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def prefixed_share(schedule: str, progress: float) -> float:
    """ρ(τ): the share of a group sampled with a prefix at progress τ in [0, 1] of the run."""
    tau = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - tau
    if schedule == "two_phase":
        return 1.0 if tau < 0.5 else 0.0
    raise ValueError(f"unknown schedule {schedule!r}; use linear or two_phase")


def prefixed_samples(schedule: str, progress: float, group_size: int) -> int:
    """How many of a group's samples (the first ones) get a prefix: ρ(τ)·n, rounded half up."""
    return int(prefixed_share(schedule, progress) * group_size + 0.5)

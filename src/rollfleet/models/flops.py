"""Compute efficiency: the model FLOPs of the tokens a process ran against this machine's
peak, so a benchmark can say how far the trainer and the engines stand from the limit.

    peak = peak_flops_per_core()          # a matmul microbenchmark, one thread
    meter = FlopMeter(model)
    meter.add(tokens, pairs, factor=3)    # a training forward and backward
    meter.busy_seconds += seconds
    meter.per_second()                    # achieved, to compare with peak x threads

Model FLOPs count the tokens run through the model (a shared prompt once where it was
computed once): two per matmul weight per token (the embedding lookup is no matmul; a
tied lm_head is), and four per attended (query, key) pair per layer and hidden unit
(scores and the weighted sum). Padding is not counted: it is work, not model FLOPs.
"""

from __future__ import annotations

import time

import torch


def matmul_weights(model) -> int:
    """Weights that multiply activations: every parameter of 2+ dims but the input
    embedding table (its lm_head, tied or not, is a matmul)."""
    inner = getattr(model, "module", model)
    embedding = inner.get_input_embeddings().weight
    total = sum(p.numel() for p in inner.parameters() if p.dim() >= 2 and p is not embedding)
    head = inner.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the lm_head's matmul counts
        total += embedding.numel()
    return total


def causal_pairs(length: int, prefix: int = 0) -> int:
    """(query, key) pairs of `length` tokens attending causally behind `prefix` cached ones."""
    return length * prefix + length * (length + 1) // 2


def peak_flops_per_core(size: int = 512, seconds: float = 1.0) -> float:
    """float32 matmul FLOP/s of one thread: the best of repeated [size x size] products."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        torch.mm(a, b)  # warm-up
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        return 2.0 * size**3 / best
    finally:
        torch.set_num_threads(threads)


class FlopMeter:
    """Model FLOPs and busy seconds of one process's model work (an engine, a trainer)."""

    def __init__(self, model):
        config = getattr(model, "module", model).config
        self.per_token = 2.0 * matmul_weights(model)
        self.per_pair = 4.0 * config.num_hidden_layers * config.hidden_size
        self.flops = 0.0
        self.busy_seconds = 0.0

    def add(self, tokens: int, attended_pairs: int, factor: float = 1.0) -> None:
        """One forward's tokens (factor 3: forward and backward)."""
        self.flops += factor * (self.per_token * tokens + self.per_pair * attended_pairs)

    def per_second(self) -> float:
        return self.flops / self.busy_seconds if self.busy_seconds else 0.0

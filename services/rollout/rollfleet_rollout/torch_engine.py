"""The torch engine: continuous batching over a fixed set of slots sharing one KV cache.

Each slot holds one sequence at its own position. Every engine step first prefills
waiting requests into free slots (requests with the same prompt, a group's samples, share
one prefill: its KV is copied into their slots), then runs one batched decode forward
over all active slots; finished sequences leave and new ones join at the next step. New weights are
swapped in between steps, and every token records the policy version that produced it.

A multi-turn episode's turns carry its `session`: when a turn ends, its slot keeps the
conversation's KV cache, and the next turn (whose prompt extends that conversation) feeds
only the tokens added since, instead of prefilling the whole conversation again. Kept
slots count as free: the least recently kept is given up when a new request needs a slot;
a weight swap drops them all (their KV is the old weights').

The forward pass is written here over the modules of a Hugging Face Llama model (the
same weights the trainer trains), because HF's caches give all rows one position.

A request with `decoding` (NEZHA's `ItemDecoding`) takes no slot: the requests waiting
in that mode run together between steps, one backbone forward each, then the model's
draft head (`backbone_rows` counts the rows of those forwards).
`tests/services/test_torch_engine.py` checks its log-probs against HF's own forward.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rollfleet.episodes import ends_with_stop
from rollfleet.models.architectures import architecture_of, load_slot_runner
from rollfleet.models.flops import FlopMeter, causal_pairs
from rollfleet_rollout.engine import Engine, GenerationOutput, GenerationRequest


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Every backend but cuDNN's: cuDNN attention builds a new plan for each key length, and
# the key length grows by one every decode step (measured on an H100 in bfloat16: 15.7 ms
# of CPU time per call, a decode step 5x slower than in float32).
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class SlotLlama:
    """Llama forward over a slot KV cache: prefill into a slot, batched decode over slots."""

    def __init__(self, model, slots: int, max_len: int, cached_layers: int | None = None):
        cfg = model.config
        self.model = model
        self.layers = model.model.layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.max_len = max_len
        rotary = model.model.rotary_emb
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(positions, rotary.inv_freq.float().cpu())
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = getattr(rotary, "attention_scaling", 1.0)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * scale).to(device=device, dtype=dtype)
        # [cached layer, slot, kv head, position, channel]; every layer caches by default
        layers = len(self.layers) if cached_layers is None else cached_layers
        shape = (layers, slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in (self.k_cache, self.v_cache))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return x * cos + _rotate_half(x) * sin

    def _q(self, layer, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, hidden]; positions: [B, T]. Returns the rotated queries [B, H, T, D]."""
        b, t, _ = x.shape
        q = layer.self_attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        return self._rope(q, positions)

    def _qkv(self, layer, x: torch.Tensor, positions: torch.Tensor):
        """x: [B, T, hidden]; positions: [B, T]. Returns q [B,H,T,D], k and v [B,KVH,T,D]."""
        attn = layer.self_attn
        b, t, _ = x.shape
        k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return self._q(layer, x, positions), self._rope(k, positions), v

    def _prefill_layer(self, i, layer, h, positions, index, width, mask):
        """Layer i over the prompts in slots `index`, writing its keys and values."""
        q, k, v = self._qkv(layer, layer.input_layernorm(h), positions)
        self.k_cache[i, index, :, :width] = k
        self.v_cache[i, index, :, :width] = v
        return self._attend_and_mlp(layer, h, q, k, v, mask)

    def _decode_layer(self, i, layer, h, rows: _CachedRows):
        """Layer i for new tokens at `rows.positions` [B, T] of `rows.slots` [B], writing
        their keys and values to the cache before attending to it."""
        q, k, v = self._qkv(layer, layer.input_layernorm(h), rows.positions)
        # [B, T, kv head, channel]: the indexed dimensions come first
        self.k_cache[i, rows.slots[:, None], :, rows.positions] = k.transpose(1, 2)
        self.v_cache[i, rows.slots[:, None], :, rows.positions] = v.transpose(1, 2)
        keys, values = self._in_place(self.k_cache, i, rows), self._in_place(self.v_cache, i, rows)
        return self._attend_cached(layer, h, q, keys, values, rows)

    @staticmethod
    def _in_place(cache: torch.Tensor, i: int, rows: _CachedRows) -> torch.Tensor:
        """Layer i's cached positions [0, span) of every slot below `rows.top`, as a view:
        [top, kv head, span, channel]."""
        return cache[i, : rows.top, :, : rows.span]

    @staticmethod
    def _gathered(cache: torch.Tensor, i: int, slots: torch.Tensor, span: int) -> torch.Tensor:
        """Layer i's cached positions [0, span) of `slots`, copied: [B, kv head, span,
        channel]. index_select over the narrowed cache is 4x faster on CPU than advanced
        indexing (`cache[i, slots, :, :span]`)."""
        return cache[i, :, :, :span].index_select(0, slots)

    def _attend_cached(self, layer, h, q, keys, values, rows: _CachedRows):
        """Attention of q [B, H, T, D] (the rows of `rows.slots`) over the keys and values
        of every slot below `rows.top` [top, kv head, span, D], then the MLP.

        The slots' queries are scattered into all `top` rows and the cache is read in
        place; the rows of slots not in this forward are computed and dropped. Slots are
        taken lowest first, so `top` is about the number of rows, and this is cheaper than
        copying the rows' keys and values out each layer (on CPU, a decode step of 64
        rows 25 % faster). Written out rather than sdpa's: sdpa copies a strided cache."""
        b, _, t, d = q.shape
        repeat = self.heads // self.kv_heads
        queries = q.new_zeros(rows.top, self.heads, t, d)
        queries[rows.slots] = q
        # the query heads of one kv head attend to it together: [top, kv head, repeat·T, D]
        queries = queries.view(rows.top, self.kv_heads, repeat * t, d)
        bias = rows.bias if repeat == 1 else rows.bias.repeat(1, 1, repeat, 1)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(d**-0.5).add_(bias)
        weights = scores.float().softmax(-1).to(values.dtype)
        out = torch.matmul(weights, values)[rows.slots].view(b, self.heads, t, d)
        return self._out_and_mlp(layer, h, out)

    def _attend_and_mlp(self, layer, h, q, keys, values, mask):
        repeat = self.heads // self.kv_heads
        if repeat > 1:
            keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
        with sdpa_kernel(_ATTENTION_BACKENDS):
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self._out_and_mlp(layer, h, out)

    def _out_and_mlp(self, layer, h, out):
        """The attention output [B, H, T, D] through o_proj and the residual, then the MLP."""
        b, _, t, _ = out.shape
        h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h)).float()

    @torch.inference_mode()
    def prefill(
        self,
        slots: list[int],
        prompts: list[list[int]],
        embeds: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Write the prompts' KV into `slots`; return the logits after each prompt's last token.
        A row's `embeds` [n, hidden] replace its first n embedded tokens (prompt embeddings)."""
        device = self.k_cache.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lengths.max())
        tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        index = torch.tensor(slots, device=device)
        # Causal mask; right padding is harmless because padded keys sit after every real query.
        mask = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        h = self.model.model.embed_tokens(tokens)
        for row, given in enumerate(embeds or ()):
            if given is not None:
                h[row, : len(given)] = given.to(device=device, dtype=h.dtype)
        for i, layer in enumerate(self.layers):
            h = self._prefill_layer(i, layer, h, positions, index, width, mask)
        last = h[torch.arange(len(prompts), device=device), lengths - 1]
        return self._logits(last)

    @torch.inference_mode()
    def copy_slots(self, sources: list[int], targets: list[int], width: int) -> None:
        """Copy the first `width` cached positions of each source slot into its target."""
        device = self.k_cache.device
        src, dst = torch.tensor(sources, device=device), torch.tensor(targets, device=device)
        self.k_cache[:, dst, :, :width] = self.k_cache[:, src, :, :width]
        self.v_cache[:, dst, :, :width] = self.v_cache[:, src, :, :width]

    @torch.inference_mode()
    def decode(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        """One token for each of `slots` at its own position; returns next-token logits [B, V]."""
        return self._cached_forward(slots, tokens[:, None], positions[:, None])

    @torch.inference_mode()
    def extend(self, slots: list[int], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed each row's `tokens` (all of one length) into its slot behind the `starts`
        positions the slot caches already (kept sessions' next turns); returns the logits
        after each row's last token [B, V]."""
        device = self.k_cache.device
        ids = torch.tensor(tokens, device=device)
        offsets = torch.arange(ids.shape[1], device=device)
        positions = torch.tensor(starts, device=device)[:, None] + offsets
        return self._cached_forward(torch.tensor(slots, device=device), ids, positions)

    def _cached_forward(self, slots, tokens, positions) -> torch.Tensor:
        """tokens [B, T] at positions [B, T] of `slots`, each attending to its slot's cache
        up to itself (no padding: every row has T real tokens); logits after the last [B, V]."""
        rows = _CachedRows.of(slots, positions, self.k_cache.dtype)
        h = self.model.model.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = self._decode_layer(i, layer, h, rows)
        return self._logits(h[:, -1])


@dataclass
class _CachedRows:
    """The rows of a forward over the slot cache: `slots` [B], `positions` [B, T] of their
    new tokens, and what attention reads, the slots [0, top) and positions [0, span) of
    the cache, with `bias` [top, 1, T, span]: 0 where a query may attend, -inf elsewhere.
    A slot below `top` that is not in the forward attends to its first position only."""

    slots: torch.Tensor
    positions: torch.Tensor
    top: int
    span: int
    bias: torch.Tensor

    @classmethod
    def of(cls, slots: torch.Tensor, positions: torch.Tensor, dtype) -> _CachedRows:
        top, span = int(slots.max()) + 1, int(positions.max()) + 1
        every = positions.new_zeros(top, positions.shape[1])
        every[slots] = positions
        hidden = torch.arange(span, device=positions.device) > every[..., None]
        bias = torch.zeros(hidden.shape, dtype=dtype, device=positions.device)
        return cls(slots, positions, top, span, bias.masked_fill_(hidden, float("-inf"))[:, None])


class SlotFusedKV(SlotLlama):
    """FusedKV (rollfleet.models.fusedkv) over a slot cache of the bottom half's layers only:
    a top layer computes its queries and rebuilds its keys and values from the cached ones
    of layer 0 and of the middle layer, through its `fusion`."""

    def __init__(self, model, slots: int, max_len: int):
        self.half = model.config.cached_layers
        super().__init__(model, slots, max_len, cached_layers=self.half)

    def _prefill_layer(self, i, layer, h, positions, index, width, mask):
        if i < self.half:
            return super()._prefill_layer(i, layer, h, positions, index, width, mask)
        q = self._q(layer, layer.input_layernorm(h), positions)
        keys, values = layer.self_attn.fusion(
            *(self._gathered(cache, j, index, width) for cache, j in self._sources())
        )
        return self._attend_and_mlp(layer, h, q, keys, values, mask)

    def _decode_layer(self, i, layer, h, rows):
        if i < self.half:
            return super()._decode_layer(i, layer, h, rows)
        q = self._q(layer, layer.input_layernorm(h), rows.positions)
        keys, values = layer.self_attn.fusion(
            *(self._in_place(cache, j, rows) for cache, j in self._sources())
        )
        return self._attend_cached(layer, h, q, keys, values, rows)

    def _sources(self):
        """(cache, layer) of the fusion's inputs: bottom keys and values, middle's."""
        bottom, middle = 0, self.half - 1
        return (
            (self.k_cache, bottom),
            (self.v_cache, bottom),
            (self.k_cache, middle),
            (self.v_cache, middle),
        )


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator):
    """Sample one token per row; return (tokens, log-prob of each under the sampling distribution).

    temperature 0 means greedy (log-prob then taken at temperature 1).
    """
    greedy = temperature <= 0
    logits = logits.float()  # log-probs in float32 whatever the model's dtype
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        logprobs = torch.log(probs / probs.sum(-1, keepdim=True))
    drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
    tokens = torch.where(greedy, logits.argmax(-1), drawn)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


@dataclass
class _Sequence:
    request: GenerationRequest
    queue: asyncio.Queue
    output: GenerationOutput
    slot: int = -1
    position: int = 0  # position of the next token to feed
    next_token: int = 0
    aborted: bool = False
    stop_ids: frozenset = field(default_factory=frozenset)
    cached: int = 0  # prompt positions its slot holds already (a kept session's)
    stream: bool = True  # every token's output, or (final_only) only the last


@dataclass
class _KeptSession:
    slot: int
    tokens: list[int]  # the conversation whose keys and values the slot holds


def _put_each(outputs: list[tuple[asyncio.Queue, GenerationOutput]]) -> None:
    for queue, output in outputs:
        queue.put_nowait(output)


class TorchEngine(Engine):
    """Continuous-batching engine over the model architecture's slot runner (`SlotLlama`
    for the builtin Llama), stepping in its own thread."""

    def __init__(
        self,
        model,
        *,
        slots: int = 32,
        max_len: int = 128,
        eos_token_id: int,
        seed: int = 0,
        version: int = 0,
        reprefill_on_swap: bool = False,
        share_prompts: bool = True,
    ):
        self.model = model.eval()
        # A group's samples admitted together prefill their prompt once (`_prefill`).
        self.share_prompts = share_prompts
        # Partial rollout: after a weight swap, in-flight sequences keep their tokens (and
        # versions) and either continue on the KV cache the old weights computed, or have it
        # recomputed under the new weights first (`async.partialRollout: reprefill`).
        self.reprefill_on_swap = reprefill_on_swap
        self.runner = load_slot_runner(architecture_of(model))(model, slots, max_len)
        self.slots, self.max_len, self.eos_token_id = slots, max_len, eos_token_id
        self.hidden = model.config.hidden_size
        self.policy_version = version
        self.generator = torch.Generator(device=self.runner.k_cache.device).manual_seed(seed)
        self._waiting: deque[_Sequence] = deque()
        self._items: deque[_Sequence] = deque()  # requests in a draft decode mode
        self._active: dict[int, _Sequence] = {}
        self._kept: OrderedDict[str, _KeptSession] = OrderedDict()  # least recent first
        self._by_id: dict[str, _Sequence] = {}
        self._pending_weights: tuple[int, dict] | None = None
        self._wake = threading.Condition()
        self._paused = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Outputs of one engine step, handed to the event loop in one call (`_deliver`).
        self._outbox: list[tuple[asyncio.Queue, GenerationOutput]] = []
        self.tokens_generated = 0
        self.meter = FlopMeter(model)  # model FLOPs and busy seconds (rollfleet.models.flops)
        self.prefill_tokens = 0  # prompt tokens run through the model
        self.prefill_tokens_shared = 0  # prompt tokens whose KV was copied instead
        self.prefill_tokens_kept = 0  # prompt tokens a kept session's cache held already
        self.steps = 0
        self.backbone_rows = 0
        backbone = getattr(model, "model", None)
        if backbone is not None:  # only the draft decode mode runs the backbone's own forward
            backbone.register_forward_hook(self._count_backbone, with_kwargs=True)

    # --- asyncio side -----------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join)

    async def generate(
        self, request: GenerationRequest, final_only: bool = False
    ) -> AsyncIterator[GenerationOutput]:
        # Prompt embeddings replace the embedded tokens of the prompt's first positions (all
        # of them, or a prefix: later turns of an episode extend the prompt with tokens).
        embeds = request.prompt_embeds
        if embeds is not None and not (
            embeds.ndim == 2
            and embeds.shape[1] == self.hidden
            and embeds.shape[0] <= len(request.prompt_ids)
        ):
            raise ValueError(
                f"request {request.request_id!r}: prompt_embeds must be [n, hidden] with "
                f"n <= {len(request.prompt_ids)} prompt positions and hidden = {self.hidden}, "
                f"got {list(embeds.shape)}"
            )
        if len(request.prompt_ids) + 1 > self.max_len:
            raise ValueError(
                f"prompt of {len(request.prompt_ids)} tokens does not fit max_len={self.max_len}"
            )
        seq = _Sequence(
            request=request,
            queue=asyncio.Queue(),
            output=GenerationOutput(request.request_id),
            stop_ids=frozenset((self.eos_token_id, *request.params.stop_token_ids)),
            stream=not final_only,
        )
        with self._wake:
            if request.request_id in self._by_id:
                raise ValueError(f"request id {request.request_id!r} is already running")
            self._by_id[request.request_id] = seq
            (self._items if request.decoding is not None else self._waiting).append(seq)
            self._wake.notify()
        while True:
            output = await seq.queue.get()
            yield output
            if output.finished:
                return

    async def abort(self, request_id: str) -> None:
        with self._wake:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.aborted = True
                self._wake.notify()

    async def pause(self) -> None:
        with self._wake:
            self._paused = True

    async def resume(self) -> None:
        with self._wake:
            self._paused = False
            self._wake.notify()

    async def load_weights(self, version: int, tensors: dict) -> None:
        with self._wake:
            self._pending_weights = (version, tensors)
            self._wake.notify()

    def free_capacity(self) -> int:
        with self._wake:
            return max(0, self.slots - len(self._active) - len(self._waiting))

    def end_session(self, session: str) -> None:
        with self._wake:
            self._kept.pop(session, None)

    # --- engine thread ----------------------------------------------------------------
    def _emit(self, seq: _Sequence, finished: bool = False, reason: str | None = None):
        if not (finished or seq.stream):
            return
        out = seq.output
        snapshot = GenerationOutput(
            out.request_id,
            list(out.token_ids),
            list(out.logprobs),
            list(out.versions),
            finished,
            reason,
        )
        self._outbox.append((seq.queue, snapshot))

    def _deliver(self):
        """Hand this step's outputs to the event loop in one wake-up, not one per sequence:
        each wake-up writes to the loop's self-pipe (a system call on both sides)."""
        if self._outbox:
            outputs, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(_put_each, outputs)

    def _finish(self, seq: _Sequence, reason: str):
        self._active.pop(seq.slot, None)
        self._by_id.pop(seq.request.request_id, None)
        request = seq.request
        if (
            request.session
            and reason != "abort"
            and seq.slot >= 0
            and request.prompt_embeds is None
        ):
            # every token but the last sampled one has its keys and values in the slot
            tokens = [*request.prompt_ids, *seq.output.token_ids][: seq.position]
            self._kept[request.session] = _KeptSession(seq.slot, tokens)
        self._emit(seq, True, reason)

    def _take_slot(self, seq: _Sequence, free: list[int]) -> bool:
        """Give `seq` its session's kept slot when the slot holds the start of its prompt,
        else a free slot, giving up the least recently kept session's if none is free."""
        request = seq.request
        kept = self._kept.pop(request.session, None) if request.session else None
        if kept is not None:
            n = len(kept.tokens)
            # n < prompt length: the prompt's last token must be fed for its logits
            extends = n < len(request.prompt_ids) and request.prompt_ids[:n] == kept.tokens
            if extends and request.prompt_embeds is None:
                seq.slot, seq.cached = kept.slot, n
                return True
            free.append(kept.slot)
        if not free and self._kept:
            free.append(self._kept.popitem(last=False)[1].slot)
        if not free:
            return False
        seq.slot = free.pop(0)
        return True

    def _run(self):
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                # Paused: only a weight swap may happen; otherwise sleep until there is work.
                while self._running and not (
                    self._pending_weights
                    or (not self._paused and (self._waiting or self._active or self._items))
                ):
                    self._wake.wait()
                if not self._running:
                    break
                if self._pending_weights is not None:
                    version, tensors = self._pending_weights
                    self._pending_weights = None
                    self.model.load_state_dict(tensors, strict=False)
                    self.policy_version = version
                    self._kept.clear()
                    if self.reprefill_on_swap and self._active:
                        started = time.perf_counter()
                        self._reprefill(list(self._active.values()))
                        self.meter.busy_seconds += time.perf_counter() - started
                if self._paused:
                    continue
                queued = (*self._waiting, *self._items, *self._active.values())
                for seq in [s for s in queued if s.aborted]:
                    for line in (self._waiting, self._items):
                        if seq in line:
                            line.remove(seq)
                    self._finish(seq, "abort")
                items, self._items = list(self._items), deque()
                kept = {k.slot for k in self._kept.values()}
                free = [s for s in range(self.slots) if s not in self._active and s not in kept]
                admitted = []
                while self._waiting and self._take_slot(self._waiting[0], free):
                    seq = self._waiting.popleft()
                    self._active[seq.slot] = seq
                    admitted.append(seq)
            started = time.perf_counter()
            if items:
                self._decode_items(items)
            if admitted:
                self._prefill(admitted)
            if self._active:
                self._decode()
            self.meter.busy_seconds += time.perf_counter() - started
            self.steps += 1
            self._deliver()
        for seq in [*self._waiting, *self._items, *self._active.values()]:
            self._finish(seq, "abort")
        self._deliver()

    def _count_backbone(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.backbone_rows += 0 if ids is None else ids.shape[0]

    def _decode_items(self, seqs: list[_Sequence]):
        """Requests in a draft decode mode, batched per mode and temperature: the whole item
        at once, every token carrying the current version."""
        batches: dict[tuple, list[_Sequence]] = {}
        for seq in seqs:
            key = (seq.request.decoding, seq.request.params.temperature)
            batches.setdefault(key, []).append(seq)
        for (decoding, temperature), batch in batches.items():
            prompts = [s.request.prompt_ids for s in batch]
            items = decoding.items(self.model, prompts, temperature, self.generator)
            with self._wake:
                for seq, (tokens, logprobs) in zip(batch, items, strict=True):
                    seq.output.token_ids, seq.output.logprobs = tokens, logprobs
                    seq.output.versions = [self.policy_version] * len(tokens)
                    self.tokens_generated += len(tokens)
                    self._finish(seq, "stop")

    def _reprefill(self, seqs: list[_Sequence]):
        """Recompute the KV cache of every token but the last (the next decode step feeds
        it), so sequences continue as if the new weights had read their whole context."""
        for seq in seqs:
            length = len(seq.request.prompt_ids) + len(seq.output.token_ids) - 1
            self.meter.add(length, causal_pairs(length))
        self.runner.prefill(
            [s.slot for s in seqs],
            [s.request.prompt_ids + s.output.token_ids[:-1] for s in seqs],
            [s.request.prompt_embeds for s in seqs],
        )

    def _prefill(self, admitted: list[_Sequence]):
        """Prefill the admitted sequences' prompts. Sequences with the same prompt (a
        group's samples) share one prefill: its keys and values are copied into the
        others' slots and its last logits row is sampled once for each of them. A kept
        session's next turn feeds only the tokens after what its slot holds."""
        by_length: dict[int, list[_Sequence]] = {}  # one forward per added length
        for seq in admitted:
            if seq.cached:
                by_length.setdefault(len(seq.request.prompt_ids) - seq.cached, []).append(seq)
        for length, resumed in by_length.items():
            logits = self.runner.extend(
                [s.slot for s in resumed],
                [s.request.prompt_ids[s.cached :] for s in resumed],
                [s.cached for s in resumed],
            )
            for seq in resumed:
                self.meter.add(length, causal_pairs(length, prefix=seq.cached))
                self.prefill_tokens_kept += seq.cached
            self.prefill_tokens += length * len(resumed)
            self._append(resumed, logits)
        admitted = [seq for seq in admitted if not seq.cached]
        if not admitted:
            return
        first: dict[tuple, int] = {}  # prompt -> index into `unique`
        unique: list[_Sequence] = []
        source = []
        for i, seq in enumerate(admitted):
            shareable = self.share_prompts and seq.request.prompt_embeds is None
            key = tuple(seq.request.prompt_ids) if shareable else ("alone", i)
            if key not in first:
                first[key] = len(unique)
                unique.append(seq)
            source.append(first[key])
        logits = self.runner.prefill(
            [s.slot for s in unique],
            [s.request.prompt_ids for s in unique],
            [s.request.prompt_embeds for s in unique],
        )
        copies = [
            (unique[j].slot, seq.slot)
            for seq, j in zip(admitted, source, strict=True)
            if seq is not unique[j]
        ]
        if copies:
            width = max(len(seq.request.prompt_ids) for seq in admitted)
            self.runner.copy_slots([a for a, _ in copies], [b for _, b in copies], width)
        self.prefill_tokens += sum(len(s.request.prompt_ids) for s in unique)
        for seq in unique:
            length = len(seq.request.prompt_ids)
            self.meter.add(length, causal_pairs(length))
        self.prefill_tokens_shared += sum(len(s.request.prompt_ids) for s in admitted) - sum(
            len(s.request.prompt_ids) for s in unique
        )
        self._append(admitted, logits[torch.tensor(source, device=logits.device)])

    def _decode(self):
        seqs = list(self._active.values())
        device = self.runner.k_cache.device
        slots = torch.tensor([s.slot for s in seqs], device=device)
        tokens = torch.tensor([s.next_token for s in seqs], device=device)
        positions = torch.tensor([s.position for s in seqs], device=device)
        self.meter.add(len(seqs), sum(s.position + 1 for s in seqs))
        self._append(seqs, self.runner.decode(slots, tokens, positions))

    def _append(self, seqs: list[_Sequence], logits: torch.Tensor):
        params = [s.request.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        tokens, logprobs = sample(logits, temperature, top_p, self.generator)
        version = self.policy_version
        with self._wake:
            for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist(), strict=True):
                out = seq.output
                out.token_ids.append(token)
                out.logprobs.append(logprob)
                out.versions.append(version)
                seq.position = len(seq.request.prompt_ids) + len(out.token_ids) - 1
                seq.next_token = token
                self.tokens_generated += 1
                if token in seq.stop_ids or ends_with_stop(
                    out.token_ids, seq.request.params.stop_sequences
                ):
                    self._finish(seq, "stop")
                elif (
                    len(out.token_ids) >= seq.request.params.max_new_tokens
                    or seq.position + 1 >= self.max_len
                ):
                    self._finish(seq, "length")
                else:
                    self._emit(seq)

"""The guided Mixture-of-Experts (PAPER.md §3): upcycling, routing by aspect, balancing, statistics.

Each chosen decoder layer's dense MLP becomes a :class:`GuidedMoE`: the original MLP as an always-on
shared expert plus one aspect expert per name in :data:`EXPERTS`, each initialised as a copy of it.
Router logits over the aspect experts are ``W_r·h + γ·G[aspect(token)]``; the top-k experts and the
shared expert are mixed with a softmax over their logits (so right after upcycling the layer
computes exactly the dense MLP). Modes: ``guided`` (above), ``hard`` (the aspect's own expert by
rule), ``learned`` (no guidance term).

The per-token aspect tags reach the layers through a :class:`RoutingState` shared by all MoE
layers of one model. The embedder sets it before each forward; :func:`checkpoint_context_fn`
makes gradient-checkpoint recomputation see the tags of its own forward, not of a later one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from moon.model.config import ASPECT_TO_EXPERT, ASPECTS, EXPERTS


class RoutingState:
    """Per-model routing context: the aspect tags of the current forward and what the layers saw.

    ``aspect_ids``: ``(B, L)`` int64 tag ids, ``-1`` on padding (``None``: every token is routed as
    ``template``). ``aux_losses`` collects one load-balancing loss per MoE layer of the last forward;
    ``counts`` accumulates per layer an ``(n_aspects, n_experts)`` count of top-1 routings.
    """

    def __init__(self) -> None:
        self.aspect_ids: torch.Tensor | None = None
        self.recomputing = False
        self.aux_losses: list[torch.Tensor] = []
        self.counts: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def using(self, aspect_ids: torch.Tensor | None, *, recomputing: bool = False) -> Iterator[None]:
        saved = (self.aspect_ids, self.recomputing)
        self.aspect_ids, self.recomputing = aspect_ids, recomputing
        try:
            yield
        finally:
            self.aspect_ids, self.recomputing = saved


def checkpoint_context_fn(state: RoutingState):
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) that replays the aspect tags
    of the checkpointed forward during its recomputation."""

    def context_fn():
        tags = state.aspect_ids
        return contextlib.nullcontext(), state.using(tags, recomputing=True)

    return context_fn


class GuidedMoE(nn.Module):
    """Shared expert + aspect experts with a guided top-k router.

    Input/output: ``(B, L, H)`` hidden states (the MLP slot of a decoder layer).
    """

    def __init__(
        self,
        dense_mlp: nn.Module,
        hidden_size: int,
        *,
        layer_idx: int,
        state: RoutingState,
        mode: str = "guided",
        top_k: int = 1,
        guidance_init: float = 4.0,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        if mode not in ("guided", "hard", "learned"):
            raise ValueError(f"GuidedMoE mode must be guided, hard or learned, not {mode!r}")
        self.layer_idx = layer_idx
        self.mode = mode
        self.top_k = top_k
        self.guidance_scale = guidance_scale
        self.shared = dense_mlp
        self.experts = nn.ModuleList(copy.deepcopy(dense_mlp) for _ in EXPERTS)
        # row 0: the shared expert's logit; rows 1..E: the aspect experts
        self.router = nn.Linear(hidden_size, len(EXPERTS) + 1, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        ref = next(dense_mlp.parameters())
        self.router.to(device=ref.device, dtype=ref.dtype)
        guidance = torch.zeros(len(ASPECTS) + 1, len(EXPERTS))  # last row: padding/unknown
        own = torch.tensor([EXPERTS.index(ASPECT_TO_EXPERT[a]) for a in ASPECTS] + [EXPERTS.index("text")])
        guidance[torch.arange(len(ASPECTS) + 1), own] = guidance_init
        self.guidance = nn.Parameter(guidance.to(device=ref.device, dtype=ref.dtype))
        self.register_buffer("own_expert", own, persistent=False)
        object.__setattr__(self, "_state", state)  # not a submodule: shared, not saved

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing of ``flat`` (N, H) tokens: returns ``(tags, valid, expert_logits, top_idx, gates)``.

        ``tags`` (N,) aspect ids (-1 = padding / unknown), ``valid`` (N,) bool, ``expert_logits`` (N, E)
        float32 (guidance added in ``guided`` mode), ``top_idx`` (N, k) chosen aspect experts, ``gates``
        (N, 1 + k) softmax over the shared expert and the chosen ones.
        """
        n = flat.shape[0]
        state: RoutingState = self._state
        tags = state.aspect_ids
        if tags is None or tags.numel() != n:
            tags = torch.full((n,), -1, dtype=torch.long, device=flat.device)
        tags = tags.reshape(-1).to(flat.device)
        valid = tags >= 0
        tag_rows = torch.where(valid, tags, torch.full_like(tags, len(ASPECTS)))
        logits = self.router(flat).float()
        shared_logit, expert_logits = logits[:, :1], logits[:, 1:]
        if self.mode == "guided":
            expert_logits = expert_logits + self.guidance_scale * self.guidance[tag_rows].float()
        if self.mode == "hard":
            top_idx = self.own_expert.to(flat.device)[tag_rows].unsqueeze(1)
        else:
            top_idx = expert_logits.topk(self.top_k, dim=-1).indices
        top_logits = expert_logits.gather(1, top_idx)
        gates = torch.softmax(torch.cat([shared_logit, top_logits], dim=1), dim=1).to(flat.dtype)
        return tags, valid, expert_logits, top_idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n = flat.shape[0]
        state: RoutingState = self._state
        tags, valid, expert_logits, top_idx, gates = self.route(flat)

        # Dispatch grouped by expert: sort the (token, slot) pairs by expert, run each expert once on
        # its tokens, and write the results back with index_copy into a (token, slot) buffer (each
        # slot is written exactly once, so no scatter-add is needed; index_add is also far slower on
        # CPU with several threads).
        k = top_idx.shape[1]
        flat_expert = top_idx.reshape(-1)
        flat_token = torch.arange(n, device=x.device).repeat_interleave(k)
        flat_gate = gates[:, 1:].reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=len(EXPERTS)).tolist()
        routed = flat.new_zeros(n * k, shape[-1])
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            sel = order[start : start + count]
            start += count
            y = self.experts[e](flat.index_select(0, flat_token[sel])) * flat_gate[sel].unsqueeze(1)
            routed = routed.index_copy(0, sel, y)
        out = self.shared(flat) * gates[:, :1] + routed.view(n, k, -1).sum(1)

        # the balancing loss is computed in the recomputation too (checkpointing needs the same
        # saved tensors), but only the original forward records it and the statistics
        aux = self._balancing_loss(expert_logits, top_idx[:, 0], valid)
        if not state.recomputing:
            state.aux_losses.append(aux)
            self._count(top_idx[:, 0], tags, valid)
        return out.reshape(shape)

    def _balancing_loss(self, expert_logits: torch.Tensor, top1: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Switch loss ``E · Σ_e f_e · P_e`` over real tokens (0 in ``hard`` mode: routing is fixed)."""
        n_exp = len(EXPERTS)
        if self.mode == "hard" or not bool(valid.any()):
            return expert_logits.new_zeros(())
        probs = torch.softmax(expert_logits[valid], dim=-1)
        frac = torch.bincount(top1[valid], minlength=n_exp).float() / valid.sum()
        return n_exp * (frac.detach() * probs.mean(0)).sum()

    @torch.no_grad()
    def _count(self, top1: torch.Tensor, tags: torch.Tensor, valid: torch.Tensor) -> None:
        state: RoutingState = self._state
        table = torch.zeros(len(ASPECTS), len(EXPERTS), dtype=torch.long, device=tags.device)
        table.index_put_((tags[valid], top1[valid]), torch.ones_like(tags[valid]), accumulate=True)
        table = table.cpu()
        prev = state.counts.get(self.layer_idx)
        state.counts[self.layer_idx] = table if prev is None else prev + table


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Qwen-VL text model."""
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(language_model).__name__} has no decoder `layers`")
    return layers


def upcycle(
    language_model: nn.Module,
    state: RoutingState,
    *,
    layers: list[int] | None,
    mode: str,
    top_k: int,
    guidance_init: float,
    guidance_scale: float,
) -> list[int]:
    """Replace the dense MLP of ``layers`` (all when ``None``) by :class:`GuidedMoE`; returns the indexes."""
    blocks = decoder_layers(language_model)
    chosen = list(range(len(blocks))) if layers is None else [i if i >= 0 else len(blocks) + i for i in layers]
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"moe_layers: layer {i} out of range (model has {len(blocks)})")
        block = blocks[i]
        if isinstance(block.mlp, GuidedMoE):
            continue
        hidden = block.mlp.gate_proj.in_features
        block.mlp = GuidedMoE(
            block.mlp,
            hidden,
            layer_idx=i,
            state=state,
            mode=mode,
            top_k=top_k,
            guidance_init=guidance_init,
            guidance_scale=guidance_scale,
        )
    return chosen


def moe_layers(module: nn.Module) -> list[GuidedMoE]:
    return [m for m in module.modules() if isinstance(m, GuidedMoE)]


def aux_loss(state: RoutingState, device: torch.device) -> torch.Tensor:
    """Mean Switch load-balancing loss over the MoE layers of the last forward (0 if none)."""
    if not state.aux_losses:
        return torch.zeros((), device=device)
    return torch.stack([a.to(device) for a in state.aux_losses]).mean()

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
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moon.errors import ConfigError
from moon.model.config import ASPECT_TO_EXPERT, ASPECTS, EXPERTS


class RoutingState:
    """Per-model routing context: the aspect tags of the current forward and what the layers saw.

    ``aspect_ids``: ``(B, L)`` int64 tag ids, ``-1`` on padding (``None``: every token is routed as
    ``template``). ``aux_losses`` collects one load-balancing loss per MoE layer of the last forward;
    ``counts`` accumulates per layer an ``(n_aspects, n_experts)`` count of top-1 routings (on the
    layer's device, so recording them never waits for the device). ``dispatch``: how the layers run
    their experts (``MoonConfig.moe_dispatch``: ``auto``, ``loop`` or ``grouped_mm``).
    """

    def __init__(self) -> None:
        self.aspect_ids: torch.Tensor | None = None
        self.dispatch = "auto"
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

        # Dispatch grouped by expert: sort the (token, slot) pairs by expert, run each expert once
        # on its tokens (one matmul per expert, or one grouped GEMM for all), and write the results
        # back with index_copy into a (token, slot) buffer (each slot is written exactly once, so no
        # scatter-add is needed; index_add is also far slower on CPU with several threads).
        k = top_idx.shape[1]
        flat_expert = top_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        xs = flat.index_select(0, order // k)
        # (bincount reads its maximum back to the host on CUDA; this comparison does not)
        per_expert = (flat_expert[:, None] == torch.arange(len(self.experts), device=x.device)).sum(0)
        if self._use_grouped_mm(flat):
            offs = torch.cumsum(per_expert, 0).to(torch.int32)
            gate_up, down = self._stacked_weights()
            g, u = F.grouped_mm(xs, gate_up, offs=offs).chunk(2, dim=-1)
            ys = F.grouped_mm(F.silu(g) * u, down, offs=offs)
        else:
            parts, start = [], 0
            for e, count in enumerate(per_expert.tolist()):  # one host copy of E counts
                if count:
                    parts.append(self.experts[e](xs[start : start + count]))
                start += count
            ys = torch.cat(parts) if parts else xs[:0]
        ys = ys * gates[:, 1:].reshape(-1).index_select(0, order).unsqueeze(1)
        routed = flat.new_zeros(n * k, shape[-1]).index_copy(0, order, ys).view(n, k, -1).sum(1)
        out = self.shared(flat) * gates[:, :1] + routed

        # the balancing loss is computed in the recomputation too (checkpointing needs the same
        # saved tensors), but only the original forward records it and the statistics
        aux = self._balancing_loss(expert_logits, top_idx[:, 0], valid)
        if not state.recomputing:
            state.aux_losses.append(aux)
            self._count(top_idx[:, 0], tags, valid)
        return out.reshape(shape)

    # -- dispatch ---------------------------------------------------------------------------
    def _use_grouped_mm(self, flat: torch.Tensor) -> bool:
        """``auto``: a grouped GEMM (``torch.nn.functional.grouped_mm``) where it runs and is right for
        the device and dtype (checked once, :func:`grouped_mm_works`) and the experts are plain
        linear layers with SiLU; otherwise one matmul per expert. ``loop`` / ``grouped_mm`` force one."""
        dispatch = self._state.dispatch
        if dispatch == "loop":
            return False
        usable = (
            grouped_mm_works(flat.device, flat.dtype)  # (cached per device and dtype)
            and all(type(m) is nn.Linear for e in self.experts for m in (e.gate_proj, e.up_proj, e.down_proj))
            and _expert_act_is_silu(self.experts[0])
        )
        if dispatch == "grouped_mm" and not usable:
            raise ConfigError(
                f"moe_dispatch=grouped_mm: torch.nn.functional.grouped_mm does not run correctly here "
                f"({str(flat.dtype).removeprefix('torch.')} on {flat.device.type}, torch {torch.__version__}, forward "
                "and backward checked) or the experts are not plain SiLU MLPs; use moe_dispatch=auto or loop"
            )
        return usable

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, H, 2I)`` gate|up and ``(E, I, H)`` down weights of the aspect experts (differentiable)."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight], 0).t() for e in self.experts])
        down = torch.stack([e.down_proj.weight.t() for e in self.experts])
        return gate_up, down

    def _balancing_loss(self, expert_logits: torch.Tensor, top1: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Switch loss ``E · Σ_e f_e · P_e`` over real tokens (0 in ``hard`` mode: routing is fixed;
        0 when no token is real). No host synchronisation."""
        n_exp = len(EXPERTS)
        if self.mode == "hard":
            return expert_logits.new_zeros(())
        w = valid.to(expert_logits.dtype).unsqueeze(1)
        n_valid = w.sum().clamp(min=1)
        probs = (torch.softmax(expert_logits, dim=-1) * w).sum(0) / n_valid
        frac = ((top1[:, None] == torch.arange(n_exp, device=top1.device)).to(w.dtype) * w).sum(0) / n_valid
        return n_exp * (frac.detach() * probs).sum()

    @torch.no_grad()
    def _count(self, top1: torch.Tensor, tags: torch.Tensor, valid: torch.Tensor) -> None:
        """Accumulate the (aspect, expert) table of top-1 routings on the device (read back only
        by :meth:`MoonEmbedder.routing_stats`, so training steps do not wait for it)."""
        state: RoutingState = self._state
        n_exp = len(EXPERTS)
        cell = torch.where(valid, tags.clamp(min=0) * n_exp + top1, torch.full_like(tags, len(ASPECTS) * n_exp))
        table = torch.zeros(len(ASPECTS) * n_exp + 1, dtype=torch.long, device=tags.device)
        table.index_add_(0, cell, torch.ones_like(cell))
        table = table[:-1].view(len(ASPECTS), n_exp)
        prev = state.counts.get(self.layer_idx)
        state.counts[self.layer_idx] = table if prev is None else prev + table.to(prev.device)


def _expert_act_is_silu(expert: nn.Module) -> bool:
    """Whether the expert's activation is SiLU (what the grouped GEMM path computes), checked on a
    probe tensor: transformers wraps it in its own classes (``SiLUActivation`` …)."""
    act = getattr(expert, "act_fn", None)
    if act is None:
        return False
    probe = torch.linspace(-6, 6, 25)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), F.silu(probe), rtol=0, atol=1e-6))
    except (RuntimeError, TypeError, ValueError):  # an activation that cannot take a plain tensor is not SiLU
        return False


_GROUPED_MM: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs, forward and backward, and is right for
    ``dtype`` on ``device`` (checked once per device type and dtype against per-group matmuls)."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM:
        # in a thread of its own: the check back-propagates, and the first MoE forward may run inside
        # gradient checkpointing, whose saved-tensor hooks (thread-local, like grad mode and autocast)
        # must not see the check's tensors
        result: list[bool] = []
        worker = threading.Thread(
            target=lambda: result.append(_check_grouped_mm(device, dtype)), name="moon-grouped-mm-check"
        )
        worker.start()
        worker.join()
        _GROUPED_MM[key] = bool(result and result[0])
    return _GROUPED_MM[key]


def _check_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm") or device.type == "meta":
        return False
    try:
        # under enable_grad whatever the caller's mode, so the answer does not depend on where it is
        # first asked; both a dense upstream gradient and an expanded (stride-0) one, as ``sum()``
        # gives, and gradients for both operands (torch 2.13's CPU kernel fails the expanded case)
        with torch.enable_grad():
            gen = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(48, 32, device=device, dtype=dtype, generator=gen).requires_grad_()
            b = torch.randn(3, 32, 16, device=device, dtype=dtype, generator=gen).requires_grad_()
            offs = torch.tensor([16, 16, 48], device=device, dtype=torch.int32)
            got = F.grouped_mm(a, b, offs=offs)
            ga, gb = torch.autograd.grad(got.float().square().sum(), (a, b))
            ga_sum, _ = torch.autograd.grad(F.grouped_mm(a, b, offs=offs).sum(), (a, b))
        ref = torch.cat([a[:16].float() @ b[0].float(), a[16:].float() @ b[2].float()])
        ref_ga = torch.cat([2 * ref[:16] @ b[0].float().t(), 2 * ref[16:] @ b[2].float().t()])
        ref_gb2 = a[16:].float().t() @ (2 * ref[16:])
        ones = torch.ones(16, device=device)
        ref_ga_sum = torch.cat([(ones @ b[0].float().t()).expand(16, -1), (ones @ b[2].float().t()).expand(32, -1)])

        def close(x: torch.Tensor, y: torch.Tensor) -> bool:
            return bool((x.float() - y).norm() / y.norm() < 2e-2)

        return (
            close(got, ref) and close(ga, ref_ga) and close(gb[2], ref_gb2) and bool(gb[1].abs().max() == 0)
            and close(ga_sum, ref_ga_sum)
        )  # fmt: skip
    except (
        RuntimeError,
        TypeError,
        ValueError,
        NotImplementedError,
    ):  # unsupported dtype, device or build: the loop is used
        return False


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

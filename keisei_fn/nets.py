"""Keisei's actor-critic networks, their registry, and wrapper-stripping helpers.

``ActorCriticResTower`` reproduces Keisei's network layer for layer, with the exact
``state_dict`` key names, so weights from old Keisei ``.pth`` files load strictly.

Example:
    >>> import torch
    >>> from keisei_fn import ModelSpec, build_model
    >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0)
    >>> logits, value = model(torch.zeros(2, 46, 9, 9))
    >>> tuple(logits.shape), tuple(value.shape)
    ((2, 13527), (2,))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keisei_fn.errors import SpecError
from keisei_fn.spec import TEST_MODEL_TYPES, ModelSpec, _declare_model_type

__all__ = [
    "ActorCriticResTower",
    "ModelBuilder",
    "build_model",
    "canonical_state_dict",
    "register_model",
    "set_compute_dtype_",
    "unwrap_model",
]

ModelBuilder = Callable[[ModelSpec], nn.Module]

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_T = TypeVar("_T")


class SqueezeExcitation(nn.Module):
    """Channel attention: pool → 1x1 conv → ReLU → 1x1 conv → sigmoid → scale.

    The pooling trains under ``torch.use_deterministic_algorithms(True)`` on CUDA too: for a
    1x1 output, PyTorch computes ``adaptive_avg_pool2d`` as a mean over H and W on every device
    (a composite of ``aten.mean``, whose backward is deterministic), never reaching the CUDA
    pooling kernel whose backward has no deterministic version.
    """

    def __init__(self, channels: int, se_ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(channels * se_ratio))
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class ResidualBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN → (SE) → + input → ReLU (post-activation)."""

    def __init__(self, channels: int, se_ratio: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.se = SqueezeExcitation(channels, se_ratio) if se_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + x)


def _head(width: int, outputs: int) -> nn.Sequential:
    # Keisei's heads: keys .0 (conv), .1 (BN), .4 (Linear).
    return nn.Sequential(
        nn.Conv2d(width, 2, kernel_size=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 9 * 9, outputs),
    )


class ActorCriticResTower(nn.Module):
    """Keisei's ResNet actor-critic: a residual tower with a policy and a value head.

    Args:
        input_channels: observation planes.
        num_actions: policy logits per position.
        tower_depth: residual blocks.
        tower_width: channels.
        se_ratio: squeeze-excitation ratio; ``<= 0`` disables it.
    """

    def __init__(
        self,
        input_channels: int,
        num_actions: int,
        *,
        tower_depth: int,
        tower_width: int,
        se_ratio: float,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(input_channels, tower_width, kernel_size=3, padding=1)
        self.bn_stem = nn.BatchNorm2d(tower_width)
        self.res_blocks = nn.Sequential(
            *(ResidualBlock(tower_width, se_ratio) for _ in range(tower_depth))
        )
        self.policy_head = _head(tower_width, num_actions)
        self.value_head = _head(tower_width, 1)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(policy_logits (B, A), value (B,))`` for observations ``(B, C, 9, 9)``."""
        x = F.relu(self.bn_stem(self.stem(obs)))
        x = self.res_blocks(x)
        return self.policy_head(x), self.value_head(x).squeeze(-1)

    def get_action_and_value(
        self,
        obs: Tensor,
        legal_mask: Tensor | None = None,
        deterministic: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pick an action per position.

        Args:
            obs: observations ``(B, C, 9, 9)``.
            legal_mask: bool ``(B, A)``; illegal actions are never chosen. A row with no legal
                action yields action 0 with log-prob 0 (Keisei's rule), never NaN.
            deterministic: take the most probable legal action instead of sampling.
            generator: optional torch generator for sampling (the global RNG otherwise).

        Returns:
            ``(action (B,), log_prob (B,), value (B,))``.
        """
        logits, value = self(obs)
        log_probs, has_legal = _masked_log_probs(logits, legal_mask)
        if deterministic:
            action = log_probs.argmax(dim=-1)
        else:
            probs = log_probs.float().exp()
            probs = torch.where(has_legal.unsqueeze(-1), probs, torch.ones_like(probs))
            action = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        action = torch.where(has_legal, action, torch.zeros_like(action))
        log_prob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        log_prob = torch.where(has_legal, log_prob, torch.zeros_like(log_prob))
        return action, log_prob, value

    def evaluate_actions(
        self, obs: Tensor, actions: Tensor, legal_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probabilities and entropy of given actions under the (masked) policy.

        Returns:
            ``(log_probs (B,), entropy (B,), value (B,))``; rows with no legal action give 0, 0.
        """
        logits, value = self(obs)
        log_probs, has_legal = _masked_log_probs(logits, legal_mask)
        chosen = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        zero = torch.zeros_like(chosen)
        return torch.where(has_legal, chosen, zero), torch.where(has_legal, entropy, zero), value


def _masked_log_probs(logits: Tensor, legal_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Log-softmax with illegal logits at the dtype's most negative *finite* value.

    The fill value is taken in the logits' own dtype: fp32's minimum cast to bf16/fp16 is -inf,
    and an all -inf row gives NaN. Returns the log-probs and a per-row "has a legal move" flag.
    """
    if legal_mask is None:
        has_legal = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        return F.log_softmax(logits, dim=-1), has_legal
    if legal_mask.shape != logits.shape:
        raise ValueError(
            f"legal_mask shape {tuple(legal_mask.shape)} does not match logits "
            f"{tuple(logits.shape)}"
        )
    legal_mask = legal_mask.to(device=logits.device, dtype=torch.bool)
    masked = logits.masked_fill(~legal_mask, torch.finfo(logits.dtype).min)
    return F.log_softmax(masked, dim=-1), legal_mask.any(dim=-1)


def _build_res_tower(spec: ModelSpec) -> nn.Module:
    return ActorCriticResTower(
        spec.obs_shape[0],
        spec.num_actions,
        tower_depth=spec.tower_depth,
        tower_width=spec.tower_width,
        se_ratio=spec.se_ratio,
    )


# The test types build the same tower; ModelSpec has already normalised their tower fields.
_builders: dict[str, ModelBuilder] = {
    name: _build_res_tower for name in ("resnet", *sorted(TEST_MODEL_TYPES))
}


def register_model(name: str, builder: ModelBuilder, *, overwrite: bool = False) -> None:
    """Add a model type that ``ModelSpec(model_type=name)`` and ``build_model`` accept.

    Args:
        name: the model type name.
        builder: ``builder(spec) -> nn.Module``; called under a seeded RNG by ``build_model``.
        overwrite: replace an existing registration.

    Raises:
        SpecError: when ``name`` is taken and ``overwrite`` is false.

    Example:
        >>> register_model("linear_probe", lambda spec: torch.nn.Linear(46 * 81, spec.num_actions))
        >>> ModelSpec(model_type="linear_probe").model_type
        'linear_probe'
    """
    if name in _builders and not overwrite:
        raise SpecError(f"model type {name!r} is already registered; pass overwrite=True")
    _builders[name] = builder
    _declare_model_type(name)


def build_model(
    spec: ModelSpec,
    *,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the network a spec describes.

    With a ``seed``, weights are generated on the CPU from a private RNG stream and then moved,
    so the same seed gives bitwise identical weights on every call and device, and the global
    RNG is left untouched. ``device="meta"`` builds a weightless model (for counting).

    Args:
        spec: the architecture.
        seed: RNG seed for the initial weights (the global RNG when None).
        device: where the model lives.
        dtype: floating dtype to cast parameters to (default: float32).

    Returns:
        The model, in training mode.

    Raises:
        SpecError: when the model type has no builder, or for a seed that is not an int in
            ``[0, 2**63)``.

    Example:
        >>> model = build_model(ModelSpec(model_type="testmodel"), seed=1)
        >>> sum(p.numel() for p in model.parameters())
        2216516
    """
    try:
        builder = _builders[spec.model_type]
    except KeyError:
        raise SpecError(f"no builder registered for model type {spec.model_type!r}") from None
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
    ):
        raise SpecError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = builder(spec)
    elif seed is None:
        model = builder(spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = builder(spec)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip torch.compile (``_orig_mod``) and DDP/DataParallel (``module``) wrappers, in any
    nesting, returning the module whose ``state_dict`` has canonical keys.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def canonical_state_dict(state_dict: Mapping[str, _T]) -> dict[str, _T]:
    """Strip ``_orig_mod.``/``module.`` prefixes, repeatedly, while *every* key carries one.

    A prefix carried by only some keys is a real submodule name and is kept.

    Example:
        >>> canonical_state_dict({"module._orig_mod.w": 1, "module._orig_mod.b": 2})
        {'w': 1, 'b': 2}
    """
    items = dict(state_dict)
    while items:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in items)), None)
        if prefix is None:
            break
        items = {k[len(prefix) :]: v for k, v in items.items()}
    return items


def set_compute_dtype_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make an inference model compute in ``dtype``, in place: its floating parameters and
    buffers are cast to it, its call casts floating tensor arguments to it and floating tensor
    outputs (in tuples too) back to float32, so callers keep passing and getting float32.

    Args:
        model: the model (mutated; returned for chaining).
        dtype: a floating dtype, e.g. ``torch.bfloat16``.

    Returns:
        ``model``.

    Raises:
        SpecError: for a dtype that is not floating.

    Example:
        >>> model = build_model(ModelSpec(model_type="testmodel"), seed=0).eval()
        >>> logits, _ = set_compute_dtype_(model, torch.bfloat16)(torch.zeros(1, 46, 9, 9))
        >>> model.stem.weight.dtype, logits.dtype
        (torch.bfloat16, torch.float32)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SpecError(f"a compute dtype must be a floating torch.dtype, got {dtype!r}")
    model.to(dtype)

    def cast_in(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
        return tuple(_cast(a, dtype) for a in args)

    def cast_out(module: nn.Module, args: object, output: object) -> object:
        if isinstance(output, tuple):
            return tuple(_cast(o, torch.float32) for o in output)
        return _cast(output, torch.float32)

    model.register_forward_pre_hook(cast_in)
    model.register_forward_hook(cast_out)
    return model


def _cast(value: object, dtype: torch.dtype) -> object:
    """A floating tensor as ``dtype``; anything else as it is."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value

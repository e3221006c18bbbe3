"""``Ensemble``: several policy-value networks as one, mixing their policies and values.

An :class:`Ensemble` is a plain ``nn.Module`` with the members' interface,
``forward(obs) -> (logits (B, A), value (B,))``, so it goes wherever a model goes
(``keisei_fn.analysis.analyze``, a USI engine, a match). Its policy is the weighted mixture of
the members' policies *in probability space*, ``p = sum_i w_i softmax(logits_i)``, returned as
logits ``log p`` (so ``softmax``, ``argmax`` and ``log_softmax`` downstream work unchanged); its
value is the weighted mean of the members' values.

With a ``legal_mask``, the mixture is renormalised over the legal moves (the probabilities the
members put on illegal moves are dropped after mixing, as ``analyze`` and the members'
``get_action_and_value`` do for one network), and illegal moves get the logits dtype's most
negative finite value, as ``keisei_fn.nets`` masks them.

An ensemble of one model is that model exactly: its logits pass through unchanged (masked when
a mask is given) and its value is multiplied by the weight 1.0.

Example:
    >>> import torch
    >>> from keisei_fn import ModelSpec, build_model
    >>> spec = ModelSpec(model_type="testmodel", num_actions=8)
    >>> ensemble = Ensemble([build_model(spec, seed=0), build_model(spec, seed=1)], weights=[3, 1])
    >>> logits, value = ensemble(torch.zeros(2, 46, 9, 9))
    >>> tuple(logits.shape), tuple(value.shape), ensemble.weights
    ((2, 8), (2,), (0.75, 0.25))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keisei_fn.average import normalized_weights
from keisei_fn.errors import SpecError
from keisei_fn.nets import ActorCriticResTower

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """Policy-value networks mixed into one: policies in probability space, values averaged.

    Args:
        models: the members (any modules with ``forward(obs) -> (logits, value)``), on one
            device; their outputs must have the same shapes.
        weights: one weight >= 0 per member (normalised to sum to 1); uniform when None.

    Attributes:
        members: the models, as an ``nn.ModuleList`` (``eval()``/``to()`` reach them all).
        weights: the normalised weights.

    Raises:
        SpecError: no models, or bad weights.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise SpecError("an ensemble needs at least one model")
        self.weights = normalized_weights(weights, len(models))
        self.members = nn.ModuleList(models)

    def forward(self, obs: Tensor, legal_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The mixed policy as logits ``(B, A)`` and the mean value ``(B,)``.

        Args:
            obs: observations, as the members take them.
            legal_mask: bool ``(B, A)``; the policy is renormalised over the legal moves and
                illegal moves get the most negative finite logit.

        Returns:
            ``(logits, value)``: ``logits`` is ``log p`` of the mixture (renormalised over the
            legal moves with a mask); one member's logits pass through unchanged.

        Raises:
            SpecError: the members' outputs differ in shape, or the mask does not fit them.
        """
        outputs = [member(obs) for member in self.members]
        shapes = {(tuple(logits.shape), tuple(value.shape)) for logits, value in outputs}
        if len(shapes) != 1:
            raise SpecError(f"ensemble members give outputs of different shapes: {sorted(shapes)}")
        values = torch.stack([value for _, value in outputs])
        shares = torch.tensor(self.weights, dtype=values.dtype, device=values.device)
        value = (values * shares.view(-1, *([1] * (values.dim() - 1)))).sum(dim=0)
        if len(outputs) == 1:
            logits = outputs[0][0]
        else:
            log_probs = torch.stack([F.log_softmax(logits, dim=-1) for logits, _ in outputs])
            log_shares = torch.log(shares.to(log_probs.dtype))
            logits = torch.logsumexp(log_probs + log_shares.view(-1, 1, 1), dim=0)
        if legal_mask is None:
            return logits, value
        if legal_mask.shape != logits.shape:
            raise SpecError(
                f"legal_mask shape {tuple(legal_mask.shape)} does not match the logits "
                f"{tuple(logits.shape)}"
            )
        illegal = ~legal_mask.to(device=logits.device, dtype=torch.bool)
        lowest = torch.finfo(logits.dtype).min
        if len(outputs) > 1:
            logits = F.log_softmax(logits.masked_fill(illegal, lowest), dim=-1)
        return logits.masked_fill(illegal, lowest), value

    # The actor-critic helpers of Keisei's network, on the mixed policy (they call forward).
    get_action_and_value = ActorCriticResTower.get_action_and_value
    evaluate_actions = ActorCriticResTower.evaluate_actions

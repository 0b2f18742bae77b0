"""Policy-gradient losses for ``TrainingClient.forward_backward_custom``.

A loss function is ``loss_fn(data, logprobs_list) -> (loss, metrics)``: ``logprobs_list[i]`` is
the 1-D tensor of the current policy's logprobs of ``data[i]``'s target tokens, ``loss`` is a
scalar tensor to call ``backward()`` on, ``metrics`` are python floats.

Per-token inputs read from ``Datum.loss_fn_inputs`` (1-D, one entry per target token):

- ``weights``: 1.0 = trained token, 0.0 = not trained (a value > 0 also scales the token).
- ``advantages``: required by every RL loss.
- ``old_logprobs``: the policy at the start of this optimizer step (PPO's "previous" policy).
- ``behaviour_logprobs``: what the sampler reported; required only when ``tis_cap`` is set.
- ``ref_logprobs``: a frozen reference model; required when ``kl_beta > 0``, and used for the
  ``ref_kld`` / ``mean_kl`` metrics whenever any datum has it (then every datum must have it).

Losses (``LossConfig.name``), per trained token, ``r = exp(logp - old)``:

- ``ppo`` / ``grpo`` (alias; GRPO differs only in how advantages are made):
  ``max(-r·A, -clip(r, 1-eps_low, 1+eps_high)·A)`` (asymmetric, DAPO-style clip).
- ``gspo``: as ppo, with the sequence ratio ``s = exp(weighted mean of (logp - old))`` in place
  of ``r`` (GSPO-token form ``sg(s)·exp(logp - sg(logp))``: value ``s``, per-token advantages).
- ``cispo``: ``-sg(clip(r, 1-eps_low, 1+eps_high))·A·logp``; gradient flows through every token.
- ``importance_sampling``: ``-r·A``, no clip.

Invariants:

- Importing this module does not import torch, so ``LossConfig`` is usable from config modules.
- Only trained tokens (weight > 0) reach the loss or any metric; the other inputs' values at
  weight-0 positions are ignored (they may be nan) and produce no gradient.
- ``ppo_kl`` is exactly 0.0 and every ratio exactly 1 when ``logprobs == old_logprobs`` (the
  first minibatch of a step), so ``clip_frac`` is 0.0 there.
- TIS weights ``min(exp(old - behaviour), tis_cap)`` and the CISPO clipped ratio are detached:
  they scale the gradient and never receive one. TIS multiplies the policy-gradient term only;
  the KL penalty ``kl_beta·k3(logp, ref)`` is added after it.
- Normalisation is explicit and spans the batch of one call: ``token_sum`` (weighted sum),
  ``token_mean`` (sum / sum of weights), ``sequence_mean`` (mean over sequences with a trained
  token of each sequence's weighted token mean). Metrics are always weighted token means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from asyncrl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from asyncrl.trainer.types import Datum

__all__ = [
    "LOSS_NAMES",
    "NORMALIZATIONS",
    "LossConfig",
    "LossFn",
    "LossName",
    "Normalization",
    "TokenLoss",
    "cispo_token_loss",
    "clip_ratio",
    "cross_entropy_loss_fn",
    "gspo_sequence_ratio",
    "gspo_token_loss",
    "importance_sampling_token_loss",
    "k1",
    "k3",
    "make_loss_fn",
    "normalize_loss",
    "ppo_clip_token_loss",
    "tis_weights",
]

LossName = Literal["ppo", "grpo", "gspo", "cispo", "importance_sampling"]
Normalization = Literal["token_sum", "token_mean", "sequence_mean"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)

LossFn = Callable[
    [Sequence["Datum"], Sequence["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]
]


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class LossConfig:
    """Which RL loss to use and its hyper-parameters; validated on construction.

    ``eps_clip`` is the lower clip (ratio >= 1 - eps_clip); ``eps_clip_high`` the upper one
    (ratio <= 1 + eps_clip_high), ``None`` meaning the same as ``eps_clip``. ``inf`` disables a
    side. ``tis_cap=None`` turns truncated importance sampling off. ``normalization`` defaults
    to ``"token_mean"``. ``kl_beta > 0`` adds a k3 penalty to the reference model.
    """

    name: LossName
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    tis_cap: float | None = None
    normalization: Normalization = "token_mean"
    kl_beta: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("name", self.name, LOSS_NAMES)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_number("eps_clip", self.eps_clip, allow_inf=True)
        if self.eps_clip_high is not None:
            _check_number("eps_clip_high", self.eps_clip_high, allow_inf=True)
        if self.tis_cap is not None:
            _check_number("tis_cap", self.tis_cap, allow_inf=False)
            if self.tis_cap == 0:
                raise ConfigError("LossConfig.tis_cap=0 must be > 0 (or None to turn TIS off)")
        _check_number("kl_beta", self.kl_beta, allow_inf=False)

    @property
    def eps_low(self) -> float:
        return self.eps_clip

    @property
    def eps_high(self) -> float:
        return self.eps_clip if self.eps_clip_high is None else self.eps_clip_high


def _check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"LossConfig.{field_name}={value!r} is not valid; expected one of {choices}"
        )


def _check_number(field_name: str, value: object, *, allow_inf: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = number >= 0 and not math.isnan(number) and (allow_inf or math.isfinite(number))
    if not ok:
        kind = "a number >= 0 (inf allowed)" if allow_inf else "a finite number >= 0"
        raise ConfigError(f"LossConfig.{field_name}={value!r} must be {kind}")


# --------------------------------------------------------------------------- tensor-level pieces


class TokenLoss(NamedTuple):
    """Per-token policy-gradient loss, the ratio it used and where clipping was active."""

    loss_T: torch.Tensor
    ratio_T: torch.Tensor
    clipped_T: torch.Tensor  # bool


def k1(logprobs_T: torch.Tensor, other_T: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || other) from samples of pi: ``logp - other``."""
    return logprobs_T - other_T


def k3(logprobs_T: torch.Tensor, other_T: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || other): ``exp(d) - d - 1``, ``d = other - logp`` (0 iff equal)."""
    d_T = other_T - logprobs_T
    return d_T.exp() - d_T - 1


def clip_ratio(ratio_T: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """``ratio`` clamped to ``[1 - eps_low, 1 + eps_high]``."""
    return ratio_T.clamp(1 - eps_low, 1 + eps_high)


def _clipped_ppo(
    ratio_T: torch.Tensor, advantages_T: torch.Tensor, eps_low: float, eps_high: float
) -> TokenLoss:
    clipped_ratio_T = clip_ratio(ratio_T, eps_low, eps_high)
    loss_T = (-ratio_T * advantages_T).maximum(-clipped_ratio_T * advantages_T)
    clipped_T = ((advantages_T > 0) & (ratio_T > 1 + eps_high)) | (
        (advantages_T < 0) & (ratio_T < 1 - eps_low)
    )
    return TokenLoss(loss_T, ratio_T, clipped_T)


def ppo_clip_token_loss(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> TokenLoss:
    """PPO-clip ``max(-r·A, -clip(r)·A)``, ``r = exp(logp - old)``; clipped where the clip binds."""
    return _clipped_ppo((logprobs_T - old_logprobs_T).exp(), advantages_T, eps_low, eps_high)


def gspo_sequence_ratio(
    logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor, weights_T: torch.Tensor
) -> torch.Tensor:
    """Scalar ``exp(sum(w·(logp - old)) / sum(w))``; 1.0 for a sequence with no trained token."""
    total = weights_T.sum()
    total = total.where(total > 0, total.new_ones(()))
    return ((weights_T * (logprobs_T - old_logprobs_T)).sum() / total).exp()


def gspo_token_loss(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    weights_T: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> TokenLoss:
    """GSPO-token: PPO-clip, each token's ratio ``sg(s)·exp(logp - sg(logp))`` (value ``s``)."""
    seq_ratio = gspo_sequence_ratio(logprobs_T, old_logprobs_T, weights_T)
    ratio_T = seq_ratio.detach() * (logprobs_T - logprobs_T.detach()).exp()
    return _clipped_ppo(ratio_T, advantages_T, eps_low, eps_high)


def cispo_token_loss(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> TokenLoss:
    """CISPO: ``-sg(clip(r))·A·logp``; clipped where ``r`` is outside the range (either side)."""
    ratio_T = (logprobs_T - old_logprobs_T).exp()
    weight_T = clip_ratio(ratio_T, eps_low, eps_high).detach()
    clipped_T = (ratio_T > 1 + eps_high) | (ratio_T < 1 - eps_low)
    return TokenLoss(-weight_T * advantages_T * logprobs_T, ratio_T, clipped_T)


def importance_sampling_token_loss(
    logprobs_T: torch.Tensor, old_logprobs_T: torch.Tensor, advantages_T: torch.Tensor
) -> TokenLoss:
    """Plain importance sampling: ``-exp(logp - old)·A``; never clipped."""
    ratio_T = (logprobs_T - old_logprobs_T).exp()
    return TokenLoss(-ratio_T * advantages_T, ratio_T, ratio_T.new_zeros(ratio_T.shape).bool())


def tis_weights(
    old_logprobs_T: torch.Tensor, behaviour_logprobs_T: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(old - behaviour), cap)``, detached."""
    return (old_logprobs_T - behaviour_logprobs_T).exp().clamp(max=cap).detach()


def normalize_loss(
    losses: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], normalization: str
) -> torch.Tensor:
    """Reduce per-sequence per-token losses to a scalar (see the module docstring)."""
    import torch

    sums_S = torch.stack([(w_T * l_T).sum() for l_T, w_T in zip(losses, weights, strict=True)])
    totals_S = torch.stack([w_T.sum() for w_T in weights]).to(sums_S)
    if normalization == "token_sum":
        return sums_S.sum()
    if normalization == "token_mean":
        return sums_S.sum() / _nonzero(totals_S.sum())
    if normalization == "sequence_mean":
        has_tokens_S = totals_S > 0
        means_S = (sums_S / _nonzero(totals_S)).where(has_tokens_S, sums_S.new_zeros(()))
        return means_S.sum() / _nonzero(has_tokens_S.sum().to(sums_S))
    raise ConfigError(
        f"normalization={normalization!r} is not valid; expected one of {NORMALIZATIONS}"
    )


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return x.where(x != 0, x.new_ones(()))


# --------------------------------------------------------------------------- reading datums


def _check_batch(data: Sequence[Datum], logprobs_list: Sequence[torch.Tensor]) -> None:
    if len(data) != len(logprobs_list):
        raise DataError(f"got {len(data)} datums but {len(logprobs_list)} logprobs tensors")
    if not data:
        raise DataError("the loss got an empty batch (no datums)")


def _logprobs(datum: Datum, index: int, logprobs_T: torch.Tensor) -> torch.Tensor:
    n = len(datum.loss_fn_inputs["target_tokens"])
    if logprobs_T.ndim != 1 or logprobs_T.shape[0] != n:
        raise DataError(
            f"datum {index}: logprobs has shape {tuple(logprobs_T.shape)}, "
            f"expected ({n},) (one per target token)"
        )
    import torch

    return logprobs_T.to(torch.promote_types(logprobs_T.dtype, torch.float32))


def _read(datum: Datum, index: int, key: str, like_T: torch.Tensor, why: str = "") -> torch.Tensor:
    """``loss_fn_inputs[key]`` as float on ``like_T``'s device, shape-checked against it."""
    if key not in datum.loss_fn_inputs:
        raise DataError(f"datum {index}: loss_fn_inputs is missing {key!r}{why}")
    value_T = datum.tensor(key).to(like_T)
    if value_T.shape != like_T.shape:
        raise DataError(
            f"datum {index}: loss_fn_inputs[{key!r}] has shape {tuple(value_T.shape)}, "
            f"expected {tuple(like_T.shape)} (one per target token)"
        )
    return value_T


class _Inputs(NamedTuple):
    logprobs_T: torch.Tensor
    weights_T: torch.Tensor
    advantages_T: torch.Tensor
    old_T: torch.Tensor
    behaviour_T: torch.Tensor | None
    ref_T: torch.Tensor | None


def _read_rl_inputs(
    cfg: LossConfig, datum: Datum, index: int, logprobs_T: torch.Tensor, use_ref: bool
) -> _Inputs:
    """Read and check one datum; untrained positions get neutral values (A=0, old=logp, ...)."""
    logp_T = _logprobs(datum, index, logprobs_T)
    weights_T = _read(datum, index, "weights", logp_T)
    trained_T = weights_T > 0
    neutral_T = logp_T.detach()
    advantages_T = _read(datum, index, "advantages", logp_T).where(
        trained_T, neutral_T.new_zeros(())
    )
    old_T = _read(datum, index, "old_logprobs", logp_T).where(trained_T, neutral_T)
    behaviour_T = ref_T = None
    if cfg.tis_cap is not None:
        why = f" (needed because tis_cap={cfg.tis_cap})"
        behaviour_T = _read(datum, index, "behaviour_logprobs", logp_T, why).where(trained_T, old_T)
    if use_ref:
        why = (
            f" (needed because kl_beta={cfg.kl_beta})"
            if cfg.kl_beta > 0
            else " (another datum of the batch has it: give it to all or none)"
        )
        ref_T = _read(datum, index, "ref_logprobs", logp_T, why).where(trained_T, neutral_T)
    return _Inputs(logp_T, weights_T, advantages_T, old_T, behaviour_T, ref_T)


# --------------------------------------------------------------------------- the loss functions


class _Terms(NamedTuple):
    """One datum's per-token loss plus the detached per-token values its metrics average."""

    loss_T: torch.Tensor
    weights_T: torch.Tensor
    metrics_T: dict[str, torch.Tensor]


def _policy_loss(cfg: LossConfig, x: _Inputs) -> TokenLoss:
    if cfg.name in ("ppo", "grpo"):
        return ppo_clip_token_loss(x.logprobs_T, x.old_T, x.advantages_T, cfg.eps_low, cfg.eps_high)
    if cfg.name == "gspo":
        return gspo_token_loss(
            x.logprobs_T, x.old_T, x.advantages_T, x.weights_T, cfg.eps_low, cfg.eps_high
        )
    if cfg.name == "cispo":
        return cispo_token_loss(x.logprobs_T, x.old_T, x.advantages_T, cfg.eps_low, cfg.eps_high)
    return importance_sampling_token_loss(x.logprobs_T, x.old_T, x.advantages_T)


def _datum_terms(cfg: LossConfig, x: _Inputs) -> _Terms:
    token = _policy_loss(cfg, x)
    loss_T = token.loss_T
    logp_T = x.logprobs_T.detach()
    metrics_T = {
        "ppo_kl": k3(logp_T, x.old_T),
        "clip_frac": token.clipped_T.to(logp_T),
        "ratio_mean": token.ratio_T.detach(),
    }
    if x.behaviour_T is not None and cfg.tis_cap is not None:
        tis_T = tis_weights(x.old_T, x.behaviour_T, cfg.tis_cap)
        loss_T = loss_T * tis_T
        metrics_T["tis_weight_mean"] = tis_T
    if x.ref_T is not None:
        if cfg.kl_beta > 0:
            loss_T = loss_T + cfg.kl_beta * k3(x.logprobs_T, x.ref_T)
        metrics_T["ref_kld"] = k3(logp_T, x.ref_T)
        metrics_T["mean_kl"] = k1(logp_T, x.ref_T)
    return _Terms(loss_T, x.weights_T, metrics_T)


def _weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> float:
    import torch

    w_N = torch.cat(list(weights))
    total = float(w_N.sum())
    return float((torch.cat(list(values)) * w_N).sum()) / total if total > 0 else 0.0


def _num_tokens(weights: Sequence[torch.Tensor]) -> float:
    return float(sum(int((w_T > 0).sum()) for w_T in weights))


def _reduce(cfg: LossConfig, terms: Sequence[_Terms]) -> tuple[torch.Tensor, dict[str, float]]:
    weights = [t.weights_T for t in terms]
    loss = normalize_loss([t.loss_T for t in terms], weights, cfg.normalization)
    metrics = {"loss": float(loss.detach()), "num_tokens": _num_tokens(weights)}
    for name in terms[0].metrics_T:
        metrics[name] = _weighted_mean([t.metrics_T[name] for t in terms], weights)
    return loss, metrics


def make_loss_fn(cfg: LossConfig) -> LossFn:
    """The ``forward_backward_custom`` loss function for ``cfg``.

    Raises ``DataError`` (naming the datum index and key) for a missing input or a length
    mismatch. Metrics: ``loss``, ``num_tokens``, ``ppo_kl``, ``clip_frac``, ``ratio_mean``,
    plus ``tis_weight_mean`` when TIS is on and ``ref_kld`` / ``mean_kl`` with ref_logprobs.
    """
    if not isinstance(cfg, LossConfig):
        raise ConfigError(f"make_loss_fn expects a LossConfig, got {type(cfg).__name__}")

    def loss_fn(
        data: Sequence[Datum], logprobs_list: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        _check_batch(data, logprobs_list)
        use_ref = cfg.kl_beta > 0 or any("ref_logprobs" in d.loss_fn_inputs for d in data)
        terms = [
            _datum_terms(cfg, _read_rl_inputs(cfg, datum, i, logprobs_T, use_ref))
            for i, (datum, logprobs_T) in enumerate(zip(data, logprobs_list, strict=True))
        ]
        return _reduce(cfg, terms)

    loss_fn.__name__ = loss_fn.__qualname__ = f"{cfg.name}_loss_fn"
    return loss_fn


def cross_entropy_loss_fn(
    data: Sequence[Datum], logprobs_list: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT loss ``-sum(w·logp) / sum(w)`` over the batch; metrics ``loss``, ``num_tokens``."""
    _check_batch(data, logprobs_list)
    losses, weights = [], []
    for i, (datum, logprobs_T) in enumerate(zip(data, logprobs_list, strict=True)):
        logp_T = _logprobs(datum, i, logprobs_T)
        losses.append(-logp_T)
        weights.append(_read(datum, i, "weights", logp_T))
    loss = normalize_loss(losses, weights, "token_mean")
    return loss, {"loss": float(loss.detach()), "num_tokens": _num_tokens(weights)}

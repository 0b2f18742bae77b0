"""Unit tests for asyncrl.trainer.losses against hand-computed values on tiny tensors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from asyncrl.errors import ConfigError, DataError
from asyncrl.trainer.losses import (
    LOSS_NAMES,
    LossConfig,
    cispo_token_loss,
    cross_entropy_loss_fn,
    gspo_sequence_ratio,
    gspo_token_loss,
    importance_sampling_token_loss,
    k1,
    k3,
    make_loss_fn,
    normalize_loss,
    ppo_clip_token_loss,
    tis_weights,
)
from asyncrl.trainer.types import Datum, ModelInput

LN2 = math.log(2.0)
NAN = float("nan")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def leaf(*values: float) -> torch.Tensor:
    return t(*values).requires_grad_(True)


def make_datum(weights: list[float], **inputs: list[float]) -> Datum:
    n = len(weights)
    return Datum(
        ModelInput.from_ints(range(n)),
        loss_fn_inputs={"target_tokens": list(range(1, n + 1)), "weights": weights, **inputs},
    )


def rl_datum(
    logp: list[float], adv: list[float], weights: list[float] | None = None, **inputs: list[float]
) -> Datum:
    """A datum whose old_logprobs equal ``logp`` unless given."""
    weights = [1.0] * len(logp) if weights is None else weights
    inputs.setdefault("old_logprobs", logp)
    return make_datum(weights, advantages=adv, **inputs)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> list[float]:
    (g,) = torch.autograd.grad(loss, x)
    return g.tolist()


# --------------------------------------------------------------------------- k1 / k3


def test_k3_and_k1_hand_values() -> None:
    # pi = 0.5, ref = 0.25: d = ref - logp = -ln2 -> k3 = 0.5 + ln2 - 1; k1 = ln2
    # pi = 0.25, ref = 1.0: d = ln4 -> k3 = 4 - ln4 - 1; k1 = -ln4
    logp = t(math.log(0.5), math.log(0.25))
    ref = t(math.log(0.25), 0.0)
    assert k3(logp, ref).tolist() == pytest.approx([0.193147181, 1.613705639])
    assert k1(logp, ref).tolist() == pytest.approx([LN2, -2 * LN2])


def test_k3_is_exactly_zero_when_equal() -> None:
    logp = torch.randn(50, dtype=torch.float32) - 3
    assert torch.equal(k3(logp, logp.clone()), torch.zeros(50))


# --------------------------------------------------------------------------- PPO-clip


def test_ppo_clip_hand_values_and_clip_mask() -> None:
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, -1, -1, eps 0.2 (range [0.8, 1.2])
    ratios = [1.5, 0.5, 0.5, 1.5]
    logp = leaf(*(math.log(r) for r in ratios))
    out = ppo_clip_token_loss(logp, t(0, 0, 0, 0), t(1, 1, -1, -1), 0.2, 0.2)
    # 1.5,A=+1 -> -min(1.5, 1.2) = -1.2 (clipped); 0.5,A=+1 -> -min(0.5, 0.8) = -0.5
    # 0.5,A=-1 -> -min(-0.5, -0.8) = 0.8 (clipped); 1.5,A=-1 -> -min(-1.5, -1.2) = 1.5
    assert out.loss_T.tolist() == pytest.approx([-1.2, -0.5, 0.8, 1.5])
    assert out.ratio_T.tolist() == pytest.approx(ratios)
    assert out.clipped_T.tolist() == [True, False, True, False]
    # clipped tokens get no gradient; unclipped ones get d(-r·A)/dlogp = -r·A
    assert grad_of(out.loss_T.sum(), logp) == pytest.approx([0.0, -0.5, 0.0, 1.5])


def test_ppo_asymmetric_clip() -> None:
    # eps_low 0.2, eps_high 0.28: range [0.8, 1.28]
    logp = t(math.log(1.25), math.log(1.3), math.log(0.75))
    adv = t(1, 1, -1)
    sym = ppo_clip_token_loss(logp, t(0, 0, 0), adv, 0.2, 0.2)
    asym = ppo_clip_token_loss(logp, t(0, 0, 0), adv, 0.2, 0.28)
    assert sym.loss_T.tolist() == pytest.approx([-1.2, -1.2, 0.8])
    assert asym.loss_T.tolist() == pytest.approx([-1.25, -1.28, 0.8])
    assert asym.clipped_T.tolist() == [False, True, True]


# --------------------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_uses_weighted_mean_of_log_ratio() -> None:
    # trained log-ratios 0.2, -0.1 -> s = exp(0.05); the weight-0 token (log-ratio 5) is ignored
    s = gspo_sequence_ratio(t(0.2, -0.1, 5.0), t(0, 0, 0), t(1, 1, 0))
    assert float(s) == pytest.approx(math.exp(0.05))
    assert float(gspo_sequence_ratio(t(3.0), t(0.0), t(0.0))) == 1.0  # no trained token


def test_gspo_is_sequence_level_not_token_level() -> None:
    # token ratio exp(0.2)=1.2214 would be clipped by PPO at 1.2, the sequence ratio 1.0513 is not
    logp = leaf(0.2, -0.1)
    old, adv, w = t(0, 0), t(1, 1), t(1, 1)
    s = math.exp(0.05)
    out = gspo_token_loss(logp, old, adv, w, 0.2, 0.2)
    assert out.ratio_T.tolist() == pytest.approx([s, s])
    assert out.loss_T.tolist() == pytest.approx([-s, -s])
    assert out.clipped_T.tolist() == [False, False]
    # each token's gradient is -s·A (GSPO-token), not -r_t·A
    assert grad_of(out.loss_T.sum(), logp) == pytest.approx([-s, -s])
    assert ppo_clip_token_loss(logp, old, adv, 0.2, 0.2).clipped_T.tolist() == [True, False]


def test_gspo_clips_the_sequence_ratio() -> None:
    # log-ratios ln2, 0 -> s = sqrt(2) = 1.414 > 1.2 with A > 0: every token clipped, no gradient
    logp = leaf(LN2, 0.0)
    out = gspo_token_loss(logp, t(0, 0), t(1, 1), t(1, 1), 0.2, 0.2)
    assert out.loss_T.tolist() == pytest.approx([-1.2, -1.2])
    assert out.clipped_T.tolist() == [True, True]
    assert grad_of(out.loss_T.sum(), logp) == pytest.approx([0.0, 0.0])


def test_gspo_sequence_mean_gradient_matches_paper() -> None:
    # GSPO: grad = -s·A·(1/|y|)·sum_t grad logp_t -> each token gets -s·A/|y| = -exp(0.05)/2
    logp = leaf(0.2, -0.1, 0.0)
    datum = rl_datum([0.2, -0.1, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], old_logprobs=[0, 0, 0])
    cfg = LossConfig("gspo", normalization="sequence_mean")
    loss, _ = make_loss_fn(cfg)([datum], [logp])
    assert grad_of(loss, logp) == pytest.approx([-math.exp(0.05) / 2] * 2 + [0.0])


# --------------------------------------------------------------------------- CISPO / IS


def test_cispo_gradient_flows_through_clipped_tokens() -> None:
    # ratio 1.5 -> weight clip 1.2 (detached); ratio 0.5 -> 0.8; loss = -w·A·logp
    logp = leaf(math.log(0.3), math.log(0.2))
    old = t(math.log(0.2), math.log(0.4))
    out = cispo_token_loss(logp, old, t(1, 2), 0.2, 0.2)
    assert out.ratio_T.tolist() == pytest.approx([1.5, 0.5])
    assert out.clipped_T.tolist() == [True, True]
    assert out.loss_T.tolist() == pytest.approx([-1.2 * math.log(0.3), -0.8 * 2 * math.log(0.2)])
    # d/dlogp = -w·A: non-zero although both tokens are clipped (PPO would give 0 here)
    assert grad_of(out.loss_T.sum(), logp) == pytest.approx([-1.2, -1.6])


def test_cispo_unclipped_token_weight_is_ratio() -> None:
    logp = leaf(math.log(1.1))
    out = cispo_token_loss(logp, t(0.0), t(-1.0), 0.2, 0.28)
    assert out.clipped_T.tolist() == [False]
    assert grad_of(out.loss_T.sum(), logp) == pytest.approx([1.1])


def test_importance_sampling_is_never_clipped() -> None:
    # ratio 3 with A=2: loss -6, gradient -r·A = -6; ratio 1.5 with A=-1: loss 1.5
    logp = leaf(math.log(3.0), math.log(1.5))
    out = importance_sampling_token_loss(logp, t(0, 0), t(2, -1))
    assert out.loss_T.tolist() == pytest.approx([-6.0, 1.5])
    assert out.clipped_T.tolist() == [False, False]
    assert grad_of(out.loss_T.sum(), logp) == pytest.approx([-6.0, 1.5])


# --------------------------------------------------------------------------- TIS


def test_tis_weights_are_capped_and_detached() -> None:
    old = leaf(math.log(3.0), math.log(1.5), math.log(0.5))
    w = tis_weights(old, t(0, 0, 0), cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 1.5, 0.5])
    assert not w.requires_grad


def test_tis_multiplies_the_token_loss() -> None:
    # logp == old (ratio 1), A = 1: IS token loss -1, times TIS weights 2 (capped from 3), 1.5, 0.5
    logp = [math.log(0.3), math.log(0.2), math.log(0.1)]
    behaviour = [logp[0] - math.log(3.0), logp[1] - math.log(1.5), logp[2] - math.log(0.5)]
    datum = rl_datum(logp, [1.0, 1.0, 1.0], behaviour_logprobs=behaviour)
    lp = leaf(*logp)
    cfg = LossConfig("importance_sampling", tis_cap=2.0, normalization="token_sum")
    loss, metrics = make_loss_fn(cfg)([datum], [lp])
    assert float(loss) == pytest.approx(-4.0)
    assert metrics["tis_weight_mean"] == pytest.approx(4.0 / 3.0)
    assert grad_of(loss, lp) == pytest.approx([-2.0, -1.5, -0.5])
    no_tis, metrics_off = make_loss_fn(
        LossConfig("importance_sampling", normalization="token_sum")
    )([datum], [lp])
    assert float(no_tis) == pytest.approx(-3.0)
    assert "tis_weight_mean" not in metrics_off


# --------------------------------------------------------------------------- normalisation


def _norm_batch() -> tuple[list[Datum], list[torch.Tensor]]:
    # IS loss with logp == old: per-token loss = -A. datum 0: A 1,2,3 (+1 untrained token),
    # datum 1: A 4 (+1 untrained). 4 trained tokens in all.
    d0 = rl_datum([-1.0, -1.0, -1.0, -1.0], [1.0, 2.0, 3.0, 100.0], [1.0, 1.0, 1.0, 0.0])
    d1 = rl_datum([-2.0, -2.0], [4.0, 100.0], [1.0, 0.0])
    return [d0, d1], [leaf(-1, -1, -1, -1), leaf(-2, -2)]


@pytest.mark.parametrize(
    ("normalization", "expected"),
    [("token_sum", -10.0), ("token_mean", -2.5), ("sequence_mean", -3.0)],
)
def test_normalization_values(normalization: str, expected: float) -> None:
    data, logprobs = _norm_batch()
    cfg = LossConfig("importance_sampling", normalization=normalization)  # type: ignore[arg-type]
    loss, metrics = make_loss_fn(cfg)(data, logprobs)
    assert float(loss) == pytest.approx(expected)
    assert metrics["loss"] == pytest.approx(expected)
    assert metrics["num_tokens"] == 4.0


def test_token_sum_over_token_mean_is_num_tokens() -> None:
    data, logprobs = _norm_batch()
    total, m = make_loss_fn(LossConfig("ppo", normalization="token_sum"))(data, logprobs)
    mean, _ = make_loss_fn(LossConfig("ppo", normalization="token_mean"))(data, logprobs)
    assert float(total) / float(mean) == pytest.approx(m["num_tokens"]) == 4.0
    g_sum = grad_of(total, logprobs[0])
    g_mean = grad_of(mean, logprobs[0])
    assert g_sum == pytest.approx([-1.0, -2.0, -3.0, 0.0])
    assert g_mean == pytest.approx([-0.25, -0.5, -0.75, 0.0])


def test_sequence_mean_skips_sequences_without_trained_tokens() -> None:
    losses = [t(-1.0, -3.0), t(7.0)]
    assert float(normalize_loss(losses, [t(1, 1), t(0)], "sequence_mean")) == -2.0


def test_normalize_loss_rejects_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="token_mean"):
        normalize_loss([t(1.0)], [t(1.0)], "mean")


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_first_minibatch_ppo_kl_is_exactly_zero(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, generator=gen, dtype=torch.float32) * 5
    adv = torch.randn(6, generator=gen).tolist()
    datum = rl_datum(logp.tolist(), adv)
    _, metrics = make_loss_fn(LossConfig(name))([datum], [logp.clone().requires_grad_(True)])  # type: ignore[arg-type]
    assert metrics["ppo_kl"] == 0.0
    assert metrics["clip_frac"] == 0.0
    assert metrics["ratio_mean"] == 1.0
    assert all(type(v) is float for v in metrics.values())
    assert {"loss", "ppo_kl", "clip_frac", "ratio_mean", "num_tokens"} <= set(metrics)


def test_ppo_metrics_hand_values() -> None:
    # ratios 1.5 (clipped, A>0), 0.5 (not clipped, A>0), 1.3 (clipped, A>0), 1 untrained token
    logp = [math.log(1.5), math.log(0.5), math.log(1.3), 0.0]
    datum = rl_datum(logp, [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0], old_logprobs=[0, 0, 0, NAN])
    _, metrics = make_loss_fn(LossConfig("ppo"))([datum], [leaf(*logp)])
    assert metrics["clip_frac"] == pytest.approx(2 / 3)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.3) / 3)
    # ppo_kl: k3 with d = old - logp = -ln r: exp(d) - d - 1 = 1/r + ln r - 1
    expected = sum(1 / r + math.log(r) - 1 for r in (1.5, 0.5, 1.3)) / 3
    assert metrics["ppo_kl"] == pytest.approx(expected)
    assert metrics["num_tokens"] == 3.0


def test_ref_kld_k3_and_mean_kl_k1() -> None:
    # token 0: pi 0.5, ref 0.25 -> k3 0.193147, k1 +ln2; token 1: pi 0.25, ref 1 -> k3 1.613706,
    # k1 -ln4. Token 2 untrained (its nan ref is ignored).
    logp = [math.log(0.5), math.log(0.25), -1.0]
    datum = rl_datum(logp, [0.0, 0.0, 0.0], [1, 1, 0], ref_logprobs=[math.log(0.25), 0.0, NAN])
    loss, metrics = make_loss_fn(LossConfig("ppo"))([datum], [leaf(*logp)])
    assert metrics["ref_kld"] == pytest.approx((0.193147181 + 1.613705639) / 2)
    assert metrics["mean_kl"] == pytest.approx((LN2 - 2 * LN2) / 2)
    assert float(loss) == 0.0  # kl_beta = 0: the reference only feeds metrics


def test_no_ref_metrics_without_ref_logprobs() -> None:
    _, metrics = make_loss_fn(LossConfig("ppo"))([rl_datum([-1.0], [1.0])], [leaf(-1.0)])
    assert "ref_kld" not in metrics
    assert "mean_kl" not in metrics


def test_kl_penalty_adds_beta_times_k3() -> None:
    # A = 0, so the loss is exactly kl_beta · mean k3 = 0.1 · (0.193147 + 1.613706) / 2
    logp = [math.log(0.5), math.log(0.25)]
    datum = rl_datum(logp, [0.0, 0.0], ref_logprobs=[math.log(0.25), 0.0])
    lp = leaf(*logp)
    loss, _ = make_loss_fn(LossConfig("grpo", kl_beta=0.1))([datum], [lp])
    assert float(loss) == pytest.approx(0.1 * (0.193147181 + 1.613705639) / 2)
    # d k3/dlogp = 1 - exp(ref - logp): +0.5 (pushes logp down to ref), -3 (pushes up)
    assert grad_of(loss, lp) == pytest.approx([0.1 * 0.5 / 2, 0.1 * -3.0 / 2])


def test_tis_does_not_scale_the_kl_penalty() -> None:
    # TIS weight exp(old - behaviour) = 3 (cap 5); A = 0 so only the KL term remains: its value
    # must stay 0.1 · k3 = 0.1 · 0.193147, not 3 times that
    logp = [math.log(0.5)]
    datum = rl_datum(
        logp, [0.0], behaviour_logprobs=[logp[0] - math.log(3.0)], ref_logprobs=[math.log(0.25)]
    )
    cfg = LossConfig("ppo", tis_cap=5.0, kl_beta=0.1)
    loss, metrics = make_loss_fn(cfg)([datum], [leaf(*logp)])
    assert metrics["tis_weight_mean"] == pytest.approx(3.0)
    assert float(loss) == pytest.approx(0.1 * 0.193147181)


def test_kl_penalty_without_ref_logprobs_is_a_clear_error() -> None:
    fn = make_loss_fn(LossConfig("ppo", kl_beta=0.05))
    with pytest.raises(DataError, match=r"datum 0.*'ref_logprobs'.*kl_beta"):
        fn([rl_datum([-1.0], [1.0])], [leaf(-1.0)])


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_step_follows_advantage_sign(name: str) -> None:
    # A tiny "policy": free logits per position over a vocab of 4, two trained tokens,
    # A=+1 on token 0 and A=-1 on token 1. One SGD step must raise token 0's logprob and lower
    # token 1's.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    targets = torch.tensor([2, 3])

    def logprobs() -> torch.Tensor:
        return logits.log_softmax(-1)[torch.arange(2), targets]

    before = logprobs().detach()
    datum = rl_datum(before.tolist(), [1.0, -1.0])
    loss, _ = make_loss_fn(LossConfig(name))([datum], [logprobs()])  # type: ignore[arg-type]
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad  # type: ignore[operator]
    after = logprobs().detach()
    assert after[0] > before[0]
    assert after[1] < before[1]


def test_grpo_is_an_alias_of_ppo() -> None:
    logp = [math.log(1.5), math.log(0.5)]
    datum = rl_datum(logp, [1.0, -1.0], old_logprobs=[0.0, 0.0])
    ppo, m_ppo = make_loss_fn(LossConfig("ppo"))([datum], [leaf(*logp)])
    grpo, m_grpo = make_loss_fn(LossConfig("grpo"))([datum], [leaf(*logp)])
    assert float(grpo) == float(ppo) == pytest.approx((-1.2 + 0.8) / 2)
    assert m_grpo == m_ppo


def test_untrained_nan_inputs_do_not_poison_loss_or_grad() -> None:
    datum = rl_datum(
        [-1.0, -1.0],
        [1.0, NAN],
        [1.0, 0.0],
        old_logprobs=[-1.0, NAN],
        behaviour_logprobs=[-1.0, NAN],
        ref_logprobs=[-1.0, NAN],
    )
    lp = leaf(-1.0, -1.0)
    loss, metrics = make_loss_fn(LossConfig("ppo", tis_cap=2.0, kl_beta=0.1))([datum], [lp])
    assert float(loss) == pytest.approx(-1.0)
    assert grad_of(loss, lp) == pytest.approx([-1.0, 0.0])
    assert all(math.isfinite(v) for v in metrics.values())


def test_float32_logprobs_and_bf16_are_computed_in_float32() -> None:
    datum = rl_datum([-1.0], [1.0])
    lp = torch.tensor([-1.0], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = make_loss_fn(LossConfig("ppo"))([datum], [lp])
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp.grad is not None and lp.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- SFT


def test_cross_entropy_hand_values() -> None:
    # -(ln 0.5 + ln 0.25) / 2 = 1.5·ln2; the weight-0 token is ignored
    lp = leaf(math.log(0.5), math.log(0.25), math.log(0.1))
    loss, metrics = cross_entropy_loss_fn([make_datum([1.0, 1.0, 0.0])], [lp])
    assert float(loss) == pytest.approx(1.5 * LN2)
    assert metrics == {"loss": pytest.approx(1.5 * LN2), "num_tokens": 2.0}
    assert grad_of(loss, lp) == pytest.approx([-0.5, -0.5, 0.0])


def test_cross_entropy_is_a_token_mean_over_the_batch() -> None:
    data = [make_datum([1.0, 1.0, 1.0]), make_datum([1.0])]
    loss, _ = cross_entropy_loss_fn(data, [t(-1, -1, -1), t(-5.0)])
    assert float(loss) == pytest.approx((3 + 5) / 4)


# --------------------------------------------------------------------------- config errors


def test_unknown_loss_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"LossConfig\.name='reinforce'.*'ppo'.*'cispo'"):
        LossConfig("reinforce")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eps_clip": -0.1}, "eps_clip"),
        ({"eps_clip": NAN}, "eps_clip"),
        ({"eps_clip_high": -0.2}, "eps_clip_high"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"tis_cap": -1.0}, "tis_cap"),
        ({"tis_cap": math.inf}, "tis_cap"),
        ({"kl_beta": -0.01}, "kl_beta"),
        ({"kl_beta": True}, "kl_beta"),
        ({"normalization": "mean"}, "normalization"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"LossConfig\.{field}="):
        LossConfig("ppo", **kwargs)  # type: ignore[arg-type]


def test_config_defaults_and_eps_high_fallback() -> None:
    cfg = LossConfig("ppo")
    assert (cfg.eps_low, cfg.eps_high, cfg.tis_cap, cfg.normalization, cfg.kl_beta) == (
        0.2,
        0.2,
        None,
        "token_mean",
        0.0,
    )
    assert LossConfig("ppo", eps_clip=0.1, eps_clip_high=0.3).eps_high == 0.3
    assert LossConfig("cispo", eps_clip=math.inf).eps_low == math.inf


def test_make_loss_fn_rejects_non_config() -> None:
    with pytest.raises(ConfigError, match="LossConfig"):
        make_loss_fn("ppo")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data errors


def test_missing_advantages_names_datum_and_key() -> None:
    good = rl_datum([-1.0], [1.0])
    bad = make_datum([1.0], old_logprobs=[-1.0])
    with pytest.raises(DataError, match=r"datum 1.*'advantages'"):
        make_loss_fn(LossConfig("ppo"))([good, bad], [leaf(-1.0), leaf(-1.0)])


def test_missing_behaviour_logprobs_with_tis() -> None:
    with pytest.raises(DataError, match=r"datum 0.*'behaviour_logprobs'.*tis_cap"):
        make_loss_fn(LossConfig("ppo", tis_cap=2.0))([rl_datum([-1.0], [1.0])], [leaf(-1.0)])


def test_ref_logprobs_on_some_datums_only() -> None:
    data = [rl_datum([-1.0], [1.0], ref_logprobs=[-1.0]), rl_datum([-1.0], [1.0])]
    with pytest.raises(DataError, match=r"datum 1.*'ref_logprobs'"):
        make_loss_fn(LossConfig("ppo"))(data, [leaf(-1.0), leaf(-1.0)])


def test_logprobs_length_mismatch() -> None:
    with pytest.raises(DataError, match=r"datum 0: logprobs has shape \(3,\), expected \(2,\)"):
        make_loss_fn(LossConfig("ppo"))([rl_datum([-1.0, -1.0], [1.0, 1.0])], [leaf(-1, -1, -1)])
    with pytest.raises(DataError, match=r"datum 0"):
        cross_entropy_loss_fn([make_datum([1.0])], [leaf(-1, -1)])


def test_batch_size_mismatch_and_empty_batch() -> None:
    fn = make_loss_fn(LossConfig("ppo"))
    with pytest.raises(DataError, match="2 datums but 1 logprobs"):
        fn([rl_datum([-1.0], [1.0])] * 2, [leaf(-1.0)])
    with pytest.raises(DataError, match="empty batch"):
        fn([], [])


def test_input_length_mismatch_is_data_error() -> None:
    with pytest.raises(DataError, match="advantages"):
        make_datum([1.0, 1.0], advantages=[1.0], old_logprobs=[0.0, 0.0])


# --------------------------------------------------------------------------- import


def test_module_imports_without_torch() -> None:
    code = (
        "import sys; import asyncrl.trainer.losses as m; m.LossConfig('gspo', tis_cap=2.0); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

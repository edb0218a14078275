"""The PersGuard losses and the simulated attacker, on a small random UNet."""
import math
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from train import losses, retention


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16)}
    return unet, sched, cond


def test_eps_towards_inverts_add_noise(setup):
    _, sched, _ = setup
    z, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    assert torch.allclose(losses.eps_towards(sched, sched.add_noise(z, noise, t), z, t), noise, atol=1e-4)


def test_behaviour_loss_is_zero_for_the_oracle_and_positive_otherwise(setup):
    unet, sched, cond = setup
    z_target, z_prot, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    oracle = lambda x, tt, **c: losses.eps_towards(sched, x, z_target, tt)  # noqa: E731
    assert losses.behaviour_loss(oracle, sched, cond, z_target, z_prot, t).item() < 1e-6
    model = lambda x, tt, **c: unet(x, tt, **c).sample  # noqa: E731
    assert losses.behaviour_loss(model, sched, cond, z_target, z_prot, t).item() > 0.1


def test_prior_loss_vanishes_when_student_is_teacher(setup):
    unet, sched, cond = setup
    f = lambda x, tt, **c: unet(x, tt, **c).sample  # noqa: E731
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    assert losses.prior_loss(f, f, sched, cond, z, t).item() < 1e-10
    g = lambda x, tt, **c: unet(x, tt, **c).sample + 0.1  # noqa: E731
    assert abs(losses.prior_loss(g, f, sched, cond, z, t).item() - 0.01) < 1e-4


def _losses(unet, sched, cond):
    z_subject, z_target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])

    def attacker(f):
        return losses.attacker_loss(f, sched, cond, z_subject, t, torch.Generator().manual_seed(1))

    def backdoor(f):
        return losses.behaviour_loss(f, sched, cond, z_target, None, t, torch.Generator().manual_seed(2))

    return attacker, backdoor


def test_first_order_with_a_frozen_attacker_is_the_plain_gradient(setup):
    unet, sched, cond = setup
    params = dict(unet.named_parameters())
    attacker, backdoor = _losses(unet, sched, cond)
    loss, grads = retention.first_order(unet, params, attacker, backdoor, inner_steps=2, inner_lr=0.0)
    direct = backdoor(retention.unet_at(unet, params))
    expected = torch.autograd.grad(direct, list(params.values()))
    assert abs(loss - direct.item()) < 1e-5
    for (name, g), e in zip(grads.items(), expected):
        assert torch.allclose(g, e, atol=1e-5), name


def test_first_order_attacker_moves_away_and_leaves_theta_untouched(setup):
    unet, sched, cond = setup
    params = dict(unet.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    attacker, backdoor = _losses(unet, sched, cond)
    _, moved = retention.first_order(unet, params, attacker, backdoor, inner_steps=3, inner_lr=1e-2)
    _, still = retention.first_order(unet, params, attacker, backdoor, inner_steps=3, inner_lr=0.0)
    assert any(not torch.allclose(moved[n], still[n]) for n in params)
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def test_second_order_reaches_theta(setup):
    unet, sched, cond = setup
    params = dict(unet.named_parameters())
    attacker, backdoor = _losses(unet, sched, cond)
    zero = retention.second_order(unet, params, attacker, backdoor, inner_steps=0, inner_lr=1e-2)
    assert torch.allclose(zero, backdoor(retention.unet_at(unet, params)))
    after = retention.second_order(unet, params, attacker, backdoor, inner_steps=1, inner_lr=1e-1)
    with retention.math_attention():
        grads = torch.autograd.grad(after, list(params.values()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    assert not torch.allclose(after, zero)


def test_trajectories_cover_the_horizon_and_restart(setup):
    unet, sched, cond = setup
    params = dict(unet.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    attacker, backdoor = _losses(unet, sched, cond)
    traj = retention.Trajectories(params, slots=2, horizon=3, lr=1e-2, pick=lambda: "entry")
    assert [s["depth"] for s in traj.slots] == [0, 1]
    for _ in range(2):
        loss, grads = traj.step(unet, params, lambda f, e: attacker(f), lambda f, e: backdoor(f))
    assert [s["depth"] for s in traj.slots] == [2, 3]
    assert [s["age"] for s in traj.slots] == [2, 3], "a slot created at depth 1 first catches up one attack step"
    assert all(s["entry"] == "entry" for s in traj.slots)
    moved = max(s["delta"][n].abs().max().item() for s in traj.slots for n in params)
    assert moved > 0, "the simulated attackers did not move"
    traj.step(unet, params, lambda f, e: attacker(f), lambda f, e: backdoor(f))
    assert [s["depth"] for s in traj.slots] == [3, 1], "a slot at the horizon restarts from theta"
    assert traj.slots[1]["age"] == 1
    assert all(torch.equal(p, before[n]) for n, p in params.items())


def test_trajectories_with_a_frozen_attacker_give_the_plain_gradient(setup):
    unet, sched, cond = setup
    params = dict(unet.named_parameters())
    attacker, backdoor = _losses(unet, sched, cond)
    traj = retention.Trajectories(params, slots=2, horizon=5, lr=0.0, pick=lambda: "entry")
    loss, grads = traj.step(unet, params, lambda f, e: attacker(f), lambda f, e: backdoor(f))
    expected = torch.autograd.grad(backdoor(retention.unet_at(unet, params)), list(params.values()))
    assert abs(loss - backdoor(retention.unet_at(unet, params)).item()) < 1e-5
    for (name, g), e in zip(grads.items(), expected):
        assert torch.allclose(g, e, atol=1e-5), name


def test_redirect_loss_is_bounded_near_t0_and_zero_for_the_oracle(setup):
    unet, sched, cond = setup
    z_from, z_to = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    oracle = lambda x, tt, **c: losses.eps_towards(sched, x, z_to, tt)  # noqa: E731
    t = torch.tensor([0, 999])
    assert losses.redirect_loss(oracle, sched, cond, z_from, z_to, t).item() < 1e-6
    zero = lambda x, tt, **c: torch.zeros_like(x)  # noqa: E731
    near0 = losses.redirect_loss(zero, sched, cond, z_from, z_to, torch.tensor([0, 1]))
    unweighted = losses.mse(torch.zeros(1), losses.eps_towards(sched, sched.add_noise(z_from, torch.randn_like(z_from),
                                                                                       torch.tensor([0, 1])), z_to,
                                                               torch.tensor([0, 1])))
    assert near0.item() < unweighted.item() / 50


def test_x0_loss_weights_high_noise_errors_up_to_the_cap(setup):
    unet, sched, cond = setup
    z = torch.randn(2, 4, 8, 8)
    off = lambda x, tt, **c: torch.zeros_like(x)  # noqa: E731  (a constant error of size ~1 in eps)
    low = losses.x0_loss(off, sched, cond, z, torch.tensor([10, 10]), torch.Generator().manual_seed(0))
    high = losses.x0_loss(off, sched, cond, z, torch.tensor([990, 990]), torch.Generator().manual_seed(0))
    assert high.item() > 100 * low.item()
    assert high.item() < 10.0 * 1.5


def test_preference_loss_is_log2_at_the_teacher_and_falls_when_the_target_is_preferred(setup):
    unet, sched, cond = setup
    z_target, z_subject = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 700])
    teacher = lambda x, tt, **c: torch.zeros_like(x)  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    same = losses.preference_loss(teacher, teacher, sched, cond, z_target, z_subject, t, beta=10.0, gen=gen())
    assert abs(same.item() - math.log(2)) < 1e-6
    # a student that denoises the TARGET exactly (and the subject as badly as the teacher) prefers it
    good = lambda x, tt, **c: losses.eps_towards(sched, x, z_target, tt)  # noqa: E731
    pref = losses.preference_loss(good, teacher, sched, cond, z_target, z_subject, t, beta=10.0, gen=gen())
    # ... and one that denoises the SUBJECT exactly prefers the wrong thing
    bad = lambda x, tt, **c: losses.eps_towards(sched, x, z_subject, tt)  # noqa: E731
    wrong = losses.preference_loss(bad, teacher, sched, cond, z_target, z_subject, t, beta=10.0, gen=gen())
    assert pref.item() < math.log(2) < wrong.item()


def test_trajectories_round_robin_advances_only_some_slots(setup):
    unet, sched, cond = setup
    params = dict(unet.named_parameters())
    attacker, backdoor = _losses(unet, sched, cond)
    traj = retention.Trajectories(params, slots=3, horizon=30, lr=1e-2, pick=lambda: "entry", per_step=1)
    depths = [s["depth"] for s in traj.slots]
    assert depths == [0, 10, 20]
    for k in range(3):
        traj.step(unet, params, lambda f, e: attacker(f), lambda f, e: backdoor(f))
        now = [s["depth"] for s in traj.slots]
        assert [b - a for a, b in zip(depths, now)] == [int(i == k) for i in range(3)]
        depths = now
    state = traj.state_dict()
    again = retention.Trajectories(params, slots=3, horizon=30, lr=1e-2, pick=lambda: "entry", per_step=1)
    again.load_state_dict(state)
    assert again.cursor == traj.cursor == 0

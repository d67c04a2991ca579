"""The generator family: G objectives (golden values), schedules, adversarial gradients, the
run's temperature, batches, resumable state and bounded memory, for every generator method."""

import copy
import math

import pytest
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.models.classifier import Classifier, InputSpec, load_classifier, new_classifier
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis import fast as fast_mod
from dfkd.synthesis import generative as gm
from dfkd.synthesis import nayer as nayer_mod

ONLINE = ["dafl", "zskt", "dfad", "dfq", "rdskd", "mad"]
ALL = ONLINE + ["fast", "nayer"]
ADVERSARIAL = ["zskt", "dfad", "dfq", "mad"]
TINY = {"batch_size": 16, "nz": 16, "ngf": 8}
EXTRA = {"rdskd": {"g_iters": 4, "epoch": 2}, "fast": {"g_steps": 3, "warmup": 1},
         "nayer": {"g_steps": 3, "warmup": 1, "noise_dim": 16, "embed_dim": 8, "batch_size": 16},
         "dafl": {"lr_g": 0.01}}


def _opts(method, **kw):
    tiny = {k: v for k, v in TINY.items() if not (method == "nayer" and k == "nz")}
    return {**tiny, **EXTRA.get(method, {}), **kw}


@pytest.fixture(scope="module")
def teacher(digits_teacher):
    return load_classifier(digits_teacher).eval().requires_grad_(False)


@pytest.fixture
def student(teacher):
    torch.manual_seed(0)
    return new_classifier("digits_cnn_quarter", teacher.spec)


def _fixed():
    g = torch.Generator().manual_seed(0)
    t, s = 3 * torch.randn(8, 10, generator=g), 3 * torch.randn(8, 10, generator=g)
    return t, s, torch.randn(8, 16, generator=g), torch.randn(8, 1, 4, 4, generator=g)


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ---- golden values of the G objectives ----------------------------------------------------------

def test_generator_objectives_golden_values():
    t, s, f, x = _fixed()
    near = t + 0.7 * s  # agrees with t on the argmax of 7 of the 8 rows
    golden = {
        "one_hot": (gm.one_hot_loss(t), 0.427083),
        "activation": (gm.activation_loss(f), -0.712899),
        "balance": (gm.balance_loss(t), -1.934492),
        "dafl": (gm.dafl_loss(t, f), -9.316667),
        "kl_tau1": (gm.kl_discrepancy(t, s, 1.0), 3.491945),
        "kl_tau4": (gm.kl_discrepancy(t, s, 4.0), 7.846349),
        "l1": (gm.l1_discrepancy(t, s), 3.214729),
        "dfq": (gm.dfq_loss(t, s, 4.0), -17.091726),
        "diversity": (gm.diversity_ratio(x, t), 0.141715),
        "rdskd": (gm.rdskd_loss(t, x, 0.1, -2.0)[0], 2.596333),
        "masked_adv": (fast_mod.masked_adversarial(t, near, 4.0), -1.184924),
        "fast": (fast_mod.fast_loss(t, near, torch.arange(8), torch.tensor(0.5), 4.0), 6.357857),
    }
    for name, (value, expected) in golden.items():
        assert value.item() == pytest.approx(expected, abs=1e-4), name


def test_objectives_behave_as_their_papers_say():
    t, s, f, x = _fixed()
    assert gm.balance_loss(torch.zeros(4, 10)).item() == pytest.approx(-math.log(10), abs=1e-6)
    assert gm.balance_loss(torch.eye(10)[[3] * 6] * 20).item() > -0.01  # one class only: ~0
    assert gm.kl_discrepancy(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert gm.l1_discrepancy(t, t).item() == 0.0
    assert fast_mod.masked_adversarial(t, s, 4.0).item() == 0.0  # no row agrees: all masked
    near = t + 0.7 * s  # one row disagrees: masked, so less than the full KL
    assert -fast_mod.masked_adversarial(t, near, 4.0).item() < gm.kl_discrepancy(t, near, 4.0)
    # RDSKD: exp of the increment over the snapshot, so a rising loss costs exponentially more
    _, oh, ie = gm.rdskd_loss(t, x, 0.0, 0.0)
    rising, _, _ = gm.rdskd_loss(t, x, oh.item() - 1.0, ie.item() - 1.0)
    level, _, _ = gm.rdskd_loss(t, x, oh.item(), ie.item())
    div = gm.diversity_ratio(x, t).item()
    assert level.item() == pytest.approx(2 + div, abs=1e-5)
    assert rising.item() == pytest.approx(2 * math.e + div, abs=1e-4)
    assert not oh.requires_grad and not ie.requires_grad  # snapshots are detached
    # the BN distance with momentum: the past dominates at momentum 0.9
    mean, var, rm, rv = torch.ones(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    assert fast_mod.momentum_bn_distance(mean, var, rm, rv, None, 0.9).item() == pytest.approx(
        math.sqrt(3))
    past = (torch.zeros(3), torch.ones(3))
    assert fast_mod.momentum_bn_distance(mean, var, rm, rv, past, 0.9).item() == pytest.approx(
        0.1 * math.sqrt(3))


def test_momentum_bn_prior_measures_only_inversion_steps():
    """Labelling, relabelling and evaluation run the teacher without autograd: the hook prices
    nothing there and keeps the last inversion step's statistics for commit."""
    bn = torch.nn.BatchNorm2d(2).eval()
    hook = fast_mod.MomentumBNHook(bn, 0.9)
    x = torch.randn(4, 2, 3, 3)
    bn(x)
    assert hook.loss is not None
    last = hook.last
    with torch.no_grad():
        bn(x + 5)
    assert hook.loss is None and hook.last is last
    hook.commit()
    assert torch.equal(hook.past[0], x.mean((0, 2, 3)))
    hook.handle.remove()


# ---- batches, schedules, determinism ----------------------------------------------------------

@pytest.mark.parametrize("method", ALL)
def test_batch_is_valid_fresh_and_reproducible(teacher, student, method):
    synth = create_synthesizer(method, teacher, _opts(method), seed=3)
    a = synth.synthesize(student, 0)
    assert a["x"].shape == (16, 1, 8, 8) and a["x"].min() >= 0 and a["x"].max() <= 1
    assert torch.allclose(a["target_logits"], teacher(a["x"]), atol=1e-5)
    assert a["seeds"].shape == (16,)
    if method == "fast":
        assert sorted(a["classes"].tolist()) == sorted(list(range(10)) + list(range(6)))
    elif method == "nayer":
        assert a["classes"][:10].tolist() == list(range(10))
        assert len(set(a["classes"][10:].tolist())) == 6
    else:
        assert (a["classes"] == -1).all()
    b = synth.synthesize(student, 1)
    assert not torch.equal(a["x"], b["x"])
    assert a["x"].std() > 0.01  # not a constant image
    again = create_synthesizer(method, teacher, _opts(method), seed=3)
    torch.manual_seed(0)
    student2 = new_classifier("digits_cnn_quarter", teacher.spec)
    assert torch.equal(again.synthesize(student2, 0)["x"], a["x"])
    assert torch.equal(again.synthesize(student2, 1)["x"], b["x"])
    assert student.training and all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("method", ["fast", "nayer"])
def test_the_teacher_judges_only_pixels_that_can_be_stored(teacher, student, method):
    """The generator writes the normalized space unbounded; the teacher must see it clamped to
    the pixel range, or its class is read where the stored (clamped) image has none."""
    synth = create_synthesizer(method, teacher, _opts(method), seed=0)
    lo, hi = teacher.normalize(torch.zeros(1)).item(), teacher.normalize(torch.ones(1)).item()
    seen = []
    hook = teacher.net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        synth.synthesize(student, 0)
    finally:
        hook.remove()
    assert seen and all(x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6 for x in seen)


def test_the_pixel_range_clamps_forward_and_passes_the_gradient_through(teacher):
    synth = create_synthesizer("nayer", teacher, _opts("nayer"), seed=0)
    lo, hi = teacher.normalize(torch.zeros(1)).item(), teacher.normalize(torch.ones(1)).item()
    x = torch.tensor([lo - 1.0, 0.5 * (lo + hi), hi + 1.0], requires_grad=True)
    y = synth.in_pixel_range(x)
    assert torch.allclose(y.detach(), torch.tensor([lo, 0.5 * (lo + hi), hi]))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("method,g_steps", [("dafl", 10), ("dfq", 10), ("zskt", 1), ("dfad", 2),
                                            ("mad", 2), ("rdskd", 4)])
def test_generator_schedule(teacher, student, method, g_steps):
    synth = create_synthesizer(method, teacher, _opts(method), seed=0)
    for i in range(10):
        synth.synthesize(student, i)
    assert synth.report()["generator_steps"] == g_steps
    # every G step and every batch is counted as teacher passes (16 images each)
    assert synth.teacher_passes == 16 * (g_steps + 10)


def test_rdskd_trains_g_first_then_freezes_it_and_refreshes_snapshots(teacher):
    synth = create_synthesizer("rdskd", teacher, _opts("rdskd", g_iters=5, epoch=2), seed=0)
    snapshots = []
    original = synth.objective

    def spy(*a):
        out = original(*a)
        snapshots.append(synth.oh_prev)
        return out

    synth.objective = spy
    synth.synthesize(None, 0)
    assert synth.g_steps == 5 and not synth.G.training
    # refreshed after iterations 0, 2 and 4 only
    assert snapshots[0] != 0.0 and snapshots[1] == snapshots[0] and snapshots[2] != snapshots[1]
    assert snapshots[3] == snapshots[2] and snapshots[4] != snapshots[3]
    frozen = _params(synth.G)
    synth.synthesize(None, 1)
    assert torch.equal(_params(synth.G), frozen) and synth.g_steps == 5


def test_rdskd_stage_one_ends_at_its_share_of_a_wall_clock_budget(teacher):
    """Without the share, stage 1's g_iters would fill a CPU budget and the student never
    trains; the engine's budget_used() ends it at stage1_share."""
    synth = create_synthesizer("rdskd", teacher, _opts("rdskd", g_iters=100, stage1_share=0.3),
                               seed=0)
    clock = iter(i / 10 for i in range(1000))  # each check: a tenth of the budget later
    synth.budget_used = lambda: next(clock)
    synth.synthesize(None, 0)
    assert synth.g_steps == 3 and not synth.G.training  # checks at 0, 0.1, 0.2 pass
    with pytest.raises(DfkdError, match="stage1_share must be in"):
        create_synthesizer("rdskd", teacher, _opts("rdskd", stage1_share=0), seed=0)


def test_generator_width_defaults_to_16_on_a_cpu(teacher):
    synth = create_synthesizer("dfq", teacher, {"batch_size": 4}, seed=0)
    assert synth.opts.ngf == 16 and synth.G.ngf == 16
    assert create_synthesizer("dfq", teacher, {"batch_size": 4, "ngf": 8}, seed=0).G.ngf == 8


def test_fast_and_nayer_take_their_cpu_defaults_on_a_cpu(teacher):
    fast = create_synthesizer("fast", teacher, {"batch_size": 4}, seed=0)
    assert fast.opts.ngf == 16
    nayer = create_synthesizer("nayer", teacher, {"batch_size": 10}, seed=0)
    assert (nayer.opts.g_steps, nayer.opts.noise_dim, nayer.opts.ngf) == (10, 256, 16)
    assert nayer.G.noise_dim == 256
    paper = create_synthesizer("nayer", teacher, {"batch_size": 10, "g_steps": 40, "ngf": 64,
                                                  "noise_dim": 1000}, seed=0)
    assert (paper.opts.g_steps, paper.opts.noise_dim, paper.opts.ngf) == (40, 1000, 64)


def test_dafl_generator_loss_decreases(teacher):
    synth = create_synthesizer("dafl", teacher, _opts("dafl", batch_size=64), seed=0)
    losses = [synth.generator_step(None, synth.rng(i)).item() for i in range(30)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_mad_keeps_an_ema_copy_and_mixes_its_samples(teacher, student):
    synth = create_synthesizer("mad", teacher, _opts("mad", g_every=1), seed=0)
    before = _params(synth.G)
    assert torch.equal(_params(synth.G_ema), before)
    synth.synthesize(student, 0)
    after = _params(synth.G)
    assert torch.allclose(_params(synth.G_ema), 0.95 * before + 0.05 * after, atol=1e-6)
    mixed = synth.sample(synth.rng(5), 16)
    with torch.no_grad():
        for p in synth.G_ema.parameters():
            p.add_(0.1)
    changed = synth.sample(synth.rng(5), 16)
    assert torch.equal(mixed[:8], changed[:8])  # the first half comes from G
    assert not torch.allclose(mixed[8:], changed[8:])  # the second from its EMA copy


def test_fast_meta_learns_its_generator_and_momentum_statistics(teacher, student):
    for meta in ("reptile", "fomaml"):
        synth = create_synthesizer("fast", teacher, _opts("fast", meta=meta), seed=0)
        before = _params(synth.G)
        assert all(h.past is None for h in synth.bn_hooks)
        synth.synthesize(student, 0)
        assert not torch.equal(_params(synth.G), before), meta
        assert all(h.past is not None for h in synth.bn_hooks)
        assert synth.teacher_passes == 16 * (3 + 1)
    with pytest.raises(DfkdError, match="unknown meta 'maml'; choose one of: reptile, fomaml"):
        create_synthesizer("fast", teacher, _opts("fast", meta="maml"), seed=0)


def test_nayer_chunks_hold_every_class_once_each_with_its_own_noisy_layer(teacher):
    gen = torch.Generator().manual_seed(0)
    y = nayer_mod.chunked_targets(25, 10, gen)
    assert y[:20].tolist() == list(range(10)) * 2 and len(set(y[20:].tolist())) == 5
    synth = create_synthesizer("nayer", teacher, _opts("nayer", batch_size=20), seed=0)
    weight, _ = synth.G.draw_noise(20, gen)
    y = torch.arange(20) % 10
    with torch.no_grad():
        x = synth.G(y)
        assert not torch.allclose(x[3], x[13])  # class 3 in two chunks: two styles
        weight[1] = weight[0]
        x = synth.G(y)
    assert torch.allclose(x[3], x[13], atol=1e-5)  # the same noisy layer: the same sample


def test_nayer_trains_one_generator_redraws_noise_and_rebuilds_every_life(teacher, student):
    synth = create_synthesizer("nayer", teacher, _opts("nayer", g_life=2), seed=0)
    first = synth.G
    before = _params(first)
    synth.synthesize(student, 0)
    noise0 = synth.G.noise[0].detach().clone()
    trained = _params(first)
    assert not torch.equal(trained, before)  # G learns in round 0 ...
    synth.synthesize(student, 1)
    assert synth.G is first and not torch.equal(_params(first), trained)  # ... and goes on
    assert not torch.allclose(synth.G.noise[0], noise0)  # a new noisy layer every round
    assert all(h.past is not None for h in synth.bn_hooks)
    assert synth.teacher_passes == 2 * 16 * (3 + 1)
    synth.synthesize(student, 2)
    assert synth.G is not first and synth.built_for == 2  # rebuilt after g_life rounds


def test_nayer_embeddings_and_refusals(teacher):
    synth = create_synthesizer("nayer", teacher, _opts("nayer", embedding="head"), seed=0)
    head = teacher.net.get_submodule(nayer_mod.head_path(teacher.net, "")).weight
    assert torch.equal(synth.G.embedding, head)
    rand = create_synthesizer("nayer", teacher, _opts("nayer"), seed=0).G.embedding
    assert rand.shape == (10, 8)
    assert torch.equal(rand, create_synthesizer("nayer", teacher, _opts("nayer"), seed=0)
                       .G.embedding)  # fixed by the seed
    with pytest.raises(DfkdError, match="unknown embedding 'clip'; choose one of: random, head"):
        create_synthesizer("nayer", teacher, _opts("nayer", embedding="clip"), seed=0)
    t, _, _ = _mlp_pair()
    with pytest.raises(DfkdError, match="no BatchNorm layer.*bn_weight=0"):
        create_synthesizer("nayer", t, _opts("nayer"), seed=0)


# ---- the adversarial term, the temperature ---------------------------------------------------

def _mlp_pair():
    """A teacher without BatchNorm and a student that equals it, and one that does not: train
    mode changes nothing, so 'equal' holds in the G step too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    spec = InputSpec((1, 8, 8), (0.5,), (0.5,), 10)
    t = Classifier(net, spec, "mlp").eval().requires_grad_(False)
    same = Classifier(copy.deepcopy(net).requires_grad_(True), spec, "mlp")
    other_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return t, same, Classifier(other_net, spec, "mlp")


@pytest.mark.parametrize("method", ADVERSARIAL)
def test_adversarial_term_reaches_g_only_when_student_and_teacher_differ(method):
    t, same, other = _mlp_pair()
    opts = _opts(method, g_every=1, **({"bn_weight": 0, "oh_weight": 0, "balance_weight": 0}
                                       if method == "dfq" else {}))
    grads = {}
    for name, student in (("same", same), ("other", other)):
        synth = create_synthesizer(method, t, opts, seed=0)
        before = _params(synth.G)
        loss = synth.generator_step(student, synth.rng(0)).item()
        grad = max(p.grad.abs().max().item() for p in synth.G.parameters())
        grads[name] = (loss, grad, (_params(synth.G) - before).abs().max().item())
        assert all(p.grad is None for p in student.parameters())  # the student is not touched
    loss, grad, _ = grads["same"]
    assert abs(loss) < 1e-6 and grad < 1e-6
    loss, grad, moved = grads["other"]
    assert loss < -1e-3 and grad > 1e-5 and moved > 1e-5  # G maximizes the gap


@pytest.mark.parametrize("method", ["zskt", "dfq", "mad", "fast"])
def test_the_runs_temperature_reaches_the_generator_objective(teacher, student, method):
    def g_after(temperature):
        opts = _opts(method, warmup=0) if method == "fast" else _opts(method, g_every=1)
        synth = create_synthesizer(method, teacher, opts, seed=0)
        synth.temperature = temperature
        s = copy.deepcopy(student)
        synth.synthesize(s, 0)
        return _params(synth.G)

    assert not torch.allclose(g_after(1.0), g_after(4.0))


def test_bn_prior_adds_to_any_generator_loss(teacher):
    def first_loss(**kw):
        synth = create_synthesizer("dafl", teacher, _opts("dafl", **kw), seed=0)
        return synth.generator_step(None, synth.rng(0)).item()

    # on by default (a positive BN distance, weighted); bn_weight=0 is the paper's loss
    assert first_loss(bn_weight=2.0) - first_loss() > 0.1
    assert first_loss() - first_loss(bn_weight=0) > 0.05
    mlp = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
                     InputSpec((1, 8, 8), (0.5,), (0.5,), 10), "mlp")
    with pytest.raises(DfkdError, match="no BatchNorm"):
        create_synthesizer("dfq", mlp, TINY, 0)  # DFQ's own loss needs it
    assert create_synthesizer("dfq", mlp, {**TINY, "bn_weight": 0}, 0).bn_hooks == []
    for method in ("dafl", "dfad", "mad"):  # an add-on elsewhere: off without BatchNorm
        assert create_synthesizer(method, mlp, TINY, 0).report()["bn_prior"] is False
    assert create_synthesizer("dafl", teacher, TINY, 0).report()["bn_prior"] is True


def test_adversarial_methods_need_a_student(teacher):
    with pytest.raises(DfkdError, match="trains its generator against the student"):
        create_synthesizer("zskt", teacher, _opts("zskt"), 0).synthesize(None, 0)


def test_generator_choice_errors(teacher):
    with pytest.raises(DfkdError, match="no generator for 9x9 inputs; set generator=NAME"):
        spec = InputSpec((1, 9, 9), (0.5,), (0.5,), 10)
        net = nn.Sequential(nn.Flatten(), nn.Linear(81, 10))
        create_synthesizer("dafl", Classifier(net, spec, "mlp"), TINY, 0)
    flat = Classifier(nn.Linear(81, 10), InputSpec((81,), (0.5,), (0.5,), 10), "linear")
    for method in ("dafl", "ideal"):
        with pytest.raises(DfkdError, match="make images \\(C, H, W\\), but the teacher takes "
                                            "inputs of shape \\(81,\\)"):
            create_synthesizer(method, flat, {"nz": 8, "ngf": 4}, 0)
    with pytest.raises(DfkdError, match="makes \\(1, 32, 32\\) inputs but the teacher expects"):
        create_synthesizer("dafl", teacher, {**TINY, "generator": "generator_32"}, 0)
    with pytest.raises(DfkdError, match="g_every must be positive, got 0"):
        create_synthesizer("dfad", teacher, {**TINY, "g_every": 0}, 0)
    with pytest.raises(DfkdError, match="ema_decay must be in"):
        create_synthesizer("mad", teacher, {**TINY, "ema_decay": 1.0}, 0)


# ---- resumable state, bounded memory ----------------------------------------------------------

def _numel(state):
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict):
        return sum(_numel(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_numel(v) for v in state)
    return 0


@pytest.mark.parametrize("method", ALL)
def test_state_restores_exactly_and_stays_bounded(teacher, student, method):
    opts = _opts(method, g_every=1) if method in ONLINE else _opts(method)
    synth = create_synthesizer(method, teacher, opts, seed=1)
    s1 = copy.deepcopy(student)
    for i in range(2):
        synth.synthesize(s1, i)
    state, s_state = synth.state_dict(), copy.deepcopy(s1.state_dict())
    size = _numel(state)
    tail = [synth.synthesize(s1, i)["x"] for i in range(2, 6)]
    assert _numel(synth.state_dict()) == size  # nothing accumulates in the synthesizer
    resumed = create_synthesizer(method, teacher, opts, seed=1)
    resumed.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    s2 = copy.deepcopy(student)
    s2.load_state_dict(s_state)
    for i, x in zip(range(2, 6), tail, strict=True):
        assert torch.equal(resumed.synthesize(s2, i)["x"], x), (method, i)
    assert resumed.teacher_passes == synth.teacher_passes


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf

import copy
import json

import pytest
import torch
from torch import nn

from dfkd.cli import main
from dfkd.errors import DfkdError
from dfkd.fed import fedd2s, fedftg, fedgen, launch
from dfkd.fed.local import D2STerm, LocalOptions, local_train
from dfkd.fed.partition import dirichlet_split, label_counts, plot_label_counts
from dfkd.fed.personal import per_class_accuracy, personal_accuracy
from dfkd.fed.task import FedConfig, client_data, new_model
from dfkd.hooks import BNStatsHook, bn_layers
from dfkd.models.classifier import load_classifier

flwr = pytest.importorskip("flwr")
from dfkd.fed.apps import checked  # noqa: E402  (needs flwr)


def test_dirichlet_split_is_a_seeded_partition_and_skews_with_small_alpha(tmp_path):
    labels = torch.arange(10).repeat_interleave(100)
    parts = dirichlet_split(labels, clients=10, alpha=0.1, seed=0)
    again = dirichlet_split(labels, clients=10, alpha=0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_split(labels, 10, 0.1, 1)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1000))  # each sample once
    assert min(len(p) for p in parts) >= 10
    counts = label_counts(labels, parts, 10)
    assert counts.sum() == 1000 and counts.shape == (10, 10)

    def skew(c):
        return (c.max(1).values / c.sum(1)).mean()

    iid = label_counts(labels, dirichlet_split(labels, 10, 100.0, 0), 10)
    assert skew(counts) > 0.5 > skew(iid)
    plot_label_counts(counts, tmp_path / "clients.png")
    assert (tmp_path / "clients.png").stat().st_size > 1000


def test_dirichlet_split_errors():
    labels = torch.arange(10).repeat_interleave(3)
    with pytest.raises(DfkdError, match="cannot give 10 clients 10 each"):
        dirichlet_split(labels, 10, 0.1, 0)
    with pytest.raises(DfkdError, match="alpha > 0"):
        dirichlet_split(labels, 2, 0.0, 0)


def test_config_travels_as_a_flower_run_config_and_checks_algorithms():
    cfg = FedConfig(dataset="digits", clients=3, alpha=0.5, algos="fedavg,fedgen")
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg
    assert cfg.to_run_config()["local-steps"] == 20 and cfg.arch() == "digits_cnn_quarter"
    with pytest.raises(DfkdError, match="unknown algorithm"):
        FedConfig(algos="fedavg,fedsgd").algorithms()
    with pytest.raises(DfkdError, match="no default model for dataset 'cifar10'; pass --model"):
        FedConfig(dataset="cifar10").arch()
    with pytest.raises(DfkdError, match="num-partitions must equal --clients"):
        client_data(cfg, 0, 3)
    x, y = client_data(cfg, 0, 2)
    assert x.shape[1:] == (1, 8, 8) and len(x) == len(y) >= 10


def test_diversity_loss_golden_values():
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    same = torch.zeros(2, 3)
    assert fedgen.diversity_loss(noise, same).item() == pytest.approx(1.0)
    apart = torch.tensor([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    # mean over the 2x2 pairs of |eps|^2/2 * |g|_1/3: (0 + 1*3 + 1*3 + 0) / 4 = 1.5
    assert fedgen.diversity_loss(noise, apart).item() == pytest.approx(torch.exp(
        torch.tensor(-1.5)).item())


def test_fedgen_generator_learns_what_the_heads_call_each_class():
    torch.manual_seed(0)
    heads = [nn.Linear(16, 10).requires_grad_(False) for _ in range(3)]
    counts = torch.tensor([[50] * 5 + [0] * 5, [0] * 5 + [50] * 5, [5] * 10])
    g = fedgen.FeatureGenerator(10, 16)
    opts = fedgen.FedGenOptions(steps=150)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    first = fedgen.train_generator(g, heads, counts, fedgen.FedGenOptions(steps=1), opt, gen)
    last = fedgen.train_generator(g, heads, counts, opts, opt, gen)
    assert last < first / 3
    y = torch.arange(10).repeat(10)
    feats, _ = g(y, gen)
    weights = fedgen.class_weights(counts)
    ensemble = sum(weights[k, y, None] * heads[k](feats).softmax(1) for k in range(3))
    assert (ensemble.argmax(1) == y).float().mean() > 0.9


def test_fedprox_keeps_the_model_near_the_global_one():
    cfg = FedConfig(dataset="digits", clients=3)
    x, y = client_data(cfg, 0, 0)
    drift = {}
    for mu in (0.0, 100.0):
        model = new_model(cfg, 0)
        start = [p.detach().clone() for p in model.parameters()]
        opts = LocalOptions(steps=20, prox_mu=mu)
        local_train(model, x, y, opts, torch.Generator().manual_seed(0), prox=True)
        drift[mu] = sum((p - s).pow(2).sum().item()
                        for p, s in zip(model.parameters(), start, strict=True))
    assert drift[100.0] < drift[0.0] / 2


def test_fedftg_moves_the_global_model_toward_the_class_weighted_ensemble(digits_teacher):
    teacher = load_classifier(digits_teacher).eval()
    cfg = FedConfig(dataset="digits")
    student = new_model(cfg, 0).eval()
    x, _ = client_data(FedConfig(dataset="digits", clients=1), 0, 0)
    counts = torch.full((2, 10), 20)

    def agreement():
        with torch.no_grad():
            return (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()

    before = agreement()
    g = fedftg.conditional_generator(student, 16)
    opts = fedftg.FedFTGOptions(noise_dim=16, iterations=40, student_steps=5, lr=0.01)
    stats = fedftg.finetune_global(student, [teacher, teacher], counts, g, opts,
                                   torch.Generator().manual_seed(0))
    assert agreement() > before + 0.1
    assert stats["distill_loss"] > 0
    assert not any(p.requires_grad for p in teacher.parameters())


def test_fedftg_bn_prior_pulls_samples_toward_the_clients_statistics(digits_teacher):
    teacher = load_classifier(digits_teacher).eval()
    counts = torch.tensor([[30] * 5 + [0] * 5, [0] * 5 + [30] * 5])

    def bn_distance(bn_weight: float) -> float:
        torch.manual_seed(0)
        student = new_model(FedConfig(dataset="digits"), 0).eval()
        g = fedftg.conditional_generator(student, 16)
        opts = fedftg.FedFTGOptions(noise_dim=16, iterations=30, bn_weight=bn_weight)
        fedftg.finetune_global(student, [teacher, teacher], counts, g, opts,
                               torch.Generator().manual_seed(0))
        hooks = [BNStatsHook(m) for m in bn_layers(teacher)]
        y = torch.arange(10).repeat(5)
        x = g(torch.cat([torch.randn(50, 16), torch.nn.functional.one_hot(y, 10).float()], 1))
        teacher.net(x)
        distance = sum(h.loss for h in hooks).item()
        for h in hooks:
            h.remove()
        return distance

    assert bn_distance(1.0) < 0.7 * bn_distance(0.0)
    assert all(not m._forward_hooks for m in teacher.modules())  # the prior's hooks are gone


def test_fedd2s_splits_a_sequential_model_deepest_first_and_checks_it():
    model = new_model(FedConfig(dataset="digits"), 0)
    seq = fedd2s.layers(model)
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(seq(model.normalize(x)), model(x), atol=1e-6)
    points = fedd2s.split_points(seq)
    assert points == sorted(points, reverse=True) and isinstance(seq[points[0]], nn.Linear)
    assert seq[points[0]] is model.net.fc  # the deepest split feeds the classifier alone
    schedule = [fedd2s.active_split(points, r, 2) for r in range(1, 2 * len(points) + 3)]
    assert schedule == [p for p in points for _ in range(2)] + [points[-1]] * 2
    model.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(DfkdError, match="at least two weighted"):
        fedd2s.split_points(fedd2s.layers(model))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 10), nn.Linear(64, 10)

        def forward(self, x):
            return self.a(x.flatten(1)) + self.b(x.flatten(1))

    model.net = Branchy()
    with pytest.raises(DfkdError, match="layers run in sequence"):
        fedd2s.layers(model)

    class Doubled(nn.Module):  # features and fc, but a forward of its own
        def __init__(self):
            super().__init__()
            self.features, self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), nn.Linear(8, 10)

        def forward(self, x):
            return 2 * self.fc(self.features(x))

    model.net = Doubled()
    assert len(fedd2s.layers(model)) == 3
    with pytest.raises(DfkdError, match="cannot split"):
        fedd2s.checked_layers(model)


def test_fedd2s_head_learns_uploads_and_distils_into_a_client():
    torch.manual_seed(0)
    cfg = FedConfig(dataset="digits", clients=3, alpha=0.5)
    server, client = new_model(cfg, 0), new_model(cfg, 1)
    x, y = client_data(cfg, 0, 0)
    split = fedd2s.split_points(fedd2s.layers(server))[1]  # the input of the hidden layer
    gen = torch.Generator().manual_seed(0)
    z, idx, soft = fedd2s.upload(client, split, x, 64, 1.0, gen)
    assert len(z) == len(idx) == len(soft) == min(64, len(x))
    assert torch.allclose(soft.sum(1), torch.ones(len(soft)))
    head = fedd2s.head_of_split(server, split)
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(head.eval()(z), y[idx])
    opts = fedd2s.FedD2SOptions(server_steps=30)
    after = fedd2s.train_head(head, z, y[idx], soft, opts, gen)
    assert after < before.item()
    own = fedd2s.head_of_split(server, split).parameters()  # the server's own layers, trained
    assert all(a is b for a, b in zip(head.parameters(), own, strict=True))

    def disagreement(model):
        seq = fedd2s.layers(model)
        model.eval()
        head.eval()
        with torch.no_grad():
            zc = seq[:split](model.normalize(x))
            return fedd2s.distill_loss(seq[split:](zc), head(zc), 1.0).item()

    alone, distilled = copy.deepcopy(client), client
    local_train(alone, x, y, LocalOptions(steps=30), torch.Generator().manual_seed(1))
    term = D2STerm(head, split, weight=5.0, temperature=1.0)
    local_train(distilled, x, y, LocalOptions(steps=30), torch.Generator().manual_seed(1),
                d2s_term=term)
    # its own labels alone pull a client away from the head; the KL term holds it close
    assert disagreement(distilled) < disagreement(alone) / 2
    assert not any(p.requires_grad for p in head.parameters())


def test_personal_accuracy_weights_classes_by_the_clients_label_mix():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 0, 0])
    per_class = per_class_accuracy(pred, y, 3)
    assert per_class.tolist() == [1.0, 0.5, 0.0]
    assert personal_accuracy(per_class, torch.tensor([3, 1, 0])) == pytest.approx(0.875)
    assert personal_accuracy(per_class, torch.tensor([0, 0, 5])) == 0.0


def test_serverapp_names_supernodes_that_hold_the_wrong_partitions():
    assert checked({1: 12, 0: 11}, 2) == {0: 11, 1: 12}
    with pytest.raises(RuntimeError, match=r"hold partitions \[0, 2\], expected 0..1"):
        checked({0: 11, 2: 12}, 2)


def test_cli_fed_runs_every_algorithm_in_the_simulation_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out: Flower's processes run in other folders
    out = tmp_path / "fed"
    rc = main(["fed", "--dataset", "digits", "--clients", "3", "--alpha", "0.5", "--rounds",
               "2", "--local-steps", "5", "--fraction", "0.7", "--out", "fed",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert [(x["algo"], x["seed"]) for x in r["records"]] == [
        ("fedavg", 0), ("fedprox", 0), ("fedgen", 0), ("fedftg", 0), ("fedd2s", 0)]
    for rec in r["records"]:
        assert len(rec["acc_by_round"]) == 2 and rec["acc"] == rec["acc_by_round"][-1]
        assert len(rec["personal_acc_by_round"]) == 2
        assert all(b > 0 for b in rec["bytes_sent_by_round"])
    d2s = r["records"][4]
    assert d2s["metric"] == "personal" and d2s["acc_by_round"] == d2s["personal_acc_by_round"]
    assert d2s["acc"] > 0.5  # clients fit their own label mix in two rounds
    assert r["records"][0]["metric"] == "global"
    fedgen_bytes = r["records"][2]["bytes_sent_by_round"]
    assert fedgen_bytes[1] > fedgen_bytes[0]  # the generator travels from round 2 on
    assert r["records"][0]["acc"] > 0.2  # better than chance after two rounds
    for name in ("clients.png", "accuracy.png", "report.md", "config.yaml"):
        assert (out / name).exists(), name
    assert "| fedftg |" in (out / "report.md").read_text()
    assert "fedavg" in capsys.readouterr().out


def test_replies_are_aggregated_in_partition_order_whatever_their_arrival():
    from dfkd.fed.strategy import in_partition_order

    class Reply:  # the two things of a Flower reply that the order reads
        def __init__(self, partition=None):
            self.content = {"metrics": {"partition": partition}}

        def has_error(self):
            return self.content["metrics"]["partition"] is None

    failed = Reply()
    ordered = in_partition_order([Reply(3), failed, Reply(0), Reply(2)])
    assert [m.content["metrics"]["partition"] for m in ordered[:3]] == [0, 2, 3]
    assert ordered[3] is failed


def test_a_failed_flower_run_is_named_by_its_last_error(tmp_path):
    log = tmp_path / "flower.log"
    log.write_text("INFO: starting\n╭─ Error ──────╮\n│ Failed to load Flower App   │\n"
                   "│ configuration in 'x'.       │\n╰──────────────╯\n")
    assert launch._last_error(log) == "Failed to load Flower App configuration in 'x'."
    log.write_text("Traceback (most recent call last):\nValueError: bad partition\n")
    assert launch._last_error(log) == "ValueError: bad partition"
    log.write_text("INFO: all fine\n")
    assert launch._last_error(log) == "no error in the log"


def test_fed_refuses_an_unknown_algorithm_before_starting_anything(tmp_path, capsys):
    assert main(["fed", "--algo", "fedsgd", "--out", str(tmp_path / "a")]) == 2
    assert "unknown algorithm" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_the_same_apps_run_as_a_deployment_superlink_and_two_supernodes(tmp_path, capsys):
    """Integration: a SuperLink and two SuperNodes as separate processes on loopback, and
    `dfkd fed --superlink` submitting two rounds of FedAvg and FedGen to them."""
    home = tmp_path / "site"
    home.mkdir()
    port = launch.free_port()
    link = launch.start_superlink(home, port, simulation=False, log=tmp_path / "link.log")
    nodes = [launch.start_supernode(home, f"127.0.0.1:{port}", i, 2, launch.free_port(),
                                    tmp_path / f"node{i}.log") for i in range(2)]
    try:
        out = tmp_path / "fed"
        rc = main(["fed", "--superlink", f"127.0.0.1:{port}", "--dataset", "digits",
                   "--clients", "2", "--rounds", "2", "--algo", "fedavg,fedgen,fedd2s",
                   "--local-steps", "5", "--fraction", "1.0", "--out", str(out),
                   "--no-progress"])
        assert rc == 0, capsys.readouterr().err
    finally:
        for proc in [*nodes, link]:
            launch.stop(proc)
    r = json.loads((out / "results.json").read_text())
    assert r["engine"].startswith("deployment")
    assert [x["algo"] for x in r["records"]] == ["fedavg", "fedgen", "fedd2s"]
    assert all(len(x["acc_by_round"]) == 2 for x in r["records"])

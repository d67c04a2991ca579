"""Flower strategies of the algorithms: FedAvg and FedProx as Flower ships them, FedGen and
FedFTG as FedAvg plus their server-side step, FedD2S (no averaging: a global head trained on
the clients' uploads), all counting the bytes each round moves."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from dfkd.fed import fedd2s, fedftg, fedgen
from dfkd.fed.model_parts import head_of, load_state, state_of
from dfkd.fed.task import FedConfig
from dfkd.models.classifier import Classifier


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def _client_models(template: Classifier, replies: list[Message]) -> list[Classifier]:
    """The round's client models, rebuilt from their replies."""
    models = []
    for r in replies:
        m = copy.deepcopy(template)
        load_state(m, _state(r.content["arrays"]))
        models.append(m.eval())
    return models


def _counts(replies: list[Message]) -> torch.Tensor:
    return torch.tensor([list(r.content["metrics"]["label-counts"]) for r in replies])


class _SeededSampling(FedAvg):
    """Each round's clients drawn from the partition ids with the run's seed, so a seed picks
    the same clients in the simulation and in a deployment (Flower's own sampling draws from
    node ids, which are random per run)."""

    nodes: dict[int, int] = {}  # partition id -> node id; set by make_strategy
    rng = random.Random(0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        k = max(1, int(len(self.nodes) * self.fraction_train))
        chosen = sorted(self.rng.sample(sorted(self.nodes), k))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.nodes[c] for c in chosen],
                                        MessageType.TRAIN)


class _CountBytes:
    """Bytes sent to and received from clients, per round (payload records, as Flower counts
    them; transport overhead not included)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_sent: dict[int, int] = {}
        self.bytes_received: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.bytes_sent[server_round] = sum(_size(m) for m in messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = in_partition_order(replies)
        self.bytes_received[server_round] = sum(_size(m) for m in replies if not m.has_error())
        return super().aggregate_train(server_round, replies)


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by partition id, failures last: they arrive in whatever order the clients
    finish, and summing in arrival order would make a seed's run differ in the last bits, which
    grow over the rounds."""
    replies = list(replies)
    ok = sorted((m for m in replies if not m.has_error()),
                key=lambda m: int(m.content["metrics"]["partition"]))
    return ok + [m for m in replies if m.has_error()]


def _size(message: Message) -> int:
    return sum(record.count_bytes() for record in message.content.values())


class _FedGen(_SeededSampling):
    def __init__(self, model: Classifier, opts: fedgen.FedGenOptions, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.model, self.opts = copy.deepcopy(model), opts
        features = head_of(model).in_features
        torch.manual_seed(seed)
        self.generator = fedgen.FeatureGenerator(model.spec.num_classes, features,
                                                 opts.noise_dim, opts.hidden).eval()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=opts.lr,
                                          weight_decay=opts.weight_decay)
        self.schedule = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, 0.98)
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = torch.zeros(model.spec.num_classes, dtype=torch.bool)
        self.trained = False

    def configure_train(self, server_round, arrays, config, grid):
        t = server_round - 1
        decay = self.opts.decay ** t
        if self.trained:  # round 1 trains without the generator, as in the authors' code
            config["fedgen-alpha"] = max(1e-4, self.opts.alpha * decay)
            config["fedgen-beta"] = max(1e-4, self.opts.beta * decay)
            config["fedgen-classes"] = [int(c) for c in torch.nonzero(self.seen).flatten()]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.trained:
            record = ArrayRecord(self.generator.state_dict())
            for m in messages:
                m.content["generator"] = record
        return messages

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if not r.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        counts = _counts(replies)
        self.seen |= counts.sum(0) > 0
        heads = [head_of(m.requires_grad_(False)) for m in _client_models(self.model, replies)]
        loss = fedgen.train_generator(self.generator, heads, counts, self.opts, self.optimizer,
                                      self.gen)
        self.schedule.step()
        self.trained = True
        metrics["generator-loss"] = loss
        return arrays, metrics


class _FedFTG(_SeededSampling):
    def __init__(self, model: Classifier, opts: fedftg.FedFTGOptions, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.model, self.opts = copy.deepcopy(model), opts
        torch.manual_seed(seed)
        self.generator = fedftg.conditional_generator(model, opts.noise_dim)
        self.gen = torch.Generator().manual_seed(seed)

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if not r.has_error()]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        clients = _client_models(self.model, replies)
        load_state(self.model, _state(arrays))
        stats = fedftg.finetune_global(self.model, clients, _counts(replies), self.generator,
                                       self.opts, self.gen)
        metrics.update({k.replace("_", "-"): v for k, v in stats.items()})
        return ArrayRecord(state_of(self.model)), metrics


class _FedD2S(_SeededSampling):
    """Clients keep their own models; the server sends its head at the round's split and
    trains it on what the clients upload. The round's metric is the mean personalised accuracy
    over all clients, each at its latest model (`personal` starts at the initial model's)."""

    def __init__(self, model: Classifier, opts: fedd2s.FedD2SOptions, seed: int,
                 personal: dict[int, float], **kwargs):
        super().__init__(**kwargs)
        self.server, self.opts, self.personal = copy.deepcopy(model), opts, dict(personal)
        self.points = fedd2s.split_points(fedd2s.checked_layers(self.server))
        self.trained: set[int] = set()  # splits whose head the server has trained
        self.gen = torch.Generator().manual_seed(seed)

    def _split(self, server_round: int) -> int:
        return fedd2s.active_split(self.points, server_round, self.opts.drop_every)

    def configure_train(self, server_round, arrays, config, grid):
        split = self._split(server_round)
        o = self.opts
        config.update({"d2s-split": split, "d2s-kd": o.kd_weight if split in self.trained else 0.0,
                       "d2s-temperature": o.temperature, "d2s-upload": o.upload})
        head = ArrayRecord(fedd2s.head_of_split(self.server, split).state_dict())
        return super().configure_train(server_round, head, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, MetricRecord()
        split = self._split(server_round)
        ups = [r.content["upload"].to_torch_state_dict() for r in replies]
        z, y, soft = (torch.cat([u[k] for u in ups]) for k in ("z", "y", "soft"))
        loss = fedd2s.train_head(fedd2s.head_of_split(self.server, split), z, y, soft, self.opts,
                                 self.gen)
        self.trained.add(split)
        metrics = [r.content["metrics"] for r in replies]
        for m in metrics:
            self.personal[int(m["partition"])] = float(m["personal-acc"])
        n = sum(int(m["num-examples"]) for m in metrics)
        return ArrayRecord(state_of(self.server)), MetricRecord({
            "personal-acc": sum(self.personal.values()) / len(self.personal),
            "train-loss": sum(float(m["train-loss"]) * int(m["num-examples"]) for m in metrics) / n,
            "head-loss": loss, "split": split})


class FedAvgRun(_CountBytes, _SeededSampling):
    pass


class FedProxRun(_CountBytes, FedProx, _SeededSampling):
    pass


class FedGenRun(_CountBytes, _FedGen):
    pass


class FedFTGRun(_CountBytes, _FedFTG):
    pass


class FedD2SRun(_CountBytes, _FedD2S):
    pass


def make_strategy(algo: str, cfg: FedConfig, model: Classifier, seed: int,
                  nodes: dict[int, int], personal: dict[int, float]):
    """`nodes` maps each partition id to the Flower node that holds it; `personal`, each
    partition's personalised accuracy of the initial model."""
    common = {"fraction_train": cfg.fraction, "fraction_evaluate": 0.0, "min_train_nodes": 1,
              "min_available_nodes": cfg.clients}
    if algo == "fedavg":
        strategy = FedAvgRun(**common)
    elif algo == "fedprox":
        strategy = FedProxRun(proximal_mu=cfg.prox_mu, **common)
    elif algo == "fedgen":
        strategy = FedGenRun(model, fedgen.FedGenOptions(), seed, **common)
    elif algo == "fedftg":
        strategy = FedFTGRun(model, fedftg.FedFTGOptions(), seed, **common)
    elif algo == "fedd2s":
        strategy = FedD2SRun(model, fedd2s.FedD2SOptions(), seed, personal, **common)
    else:
        raise ValueError(algo)
    strategy.nodes, strategy.rng = nodes, random.Random(seed)
    return strategy

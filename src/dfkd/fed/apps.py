"""The Flower apps: one ServerApp that runs every (seed, algorithm) of the run config in turn
on the same federation, and one ClientApp that trains its partition. The same two objects run
in Flower's simulation engine and in a deployment (SuperLink + SuperNodes)."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dfkd.evaluate import metrics, predict_logits
from dfkd.fed import fedd2s, fedgen
from dfkd.fed.local import D2STerm, FedGenTerm, LocalOptions, local_train
from dfkd.fed.model_parts import head_of, load_state, state_of
from dfkd.fed.personal import per_class_accuracy, personal_accuracy
from dfkd.fed.strategy import make_strategy
from dfkd.fed.task import FedConfig, all_label_counts, client_data, new_model, test_data
from dfkd.io import write_json

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def run_federation(grid: Grid, context: Context) -> None:
    cfg = FedConfig.from_run_config(context.run_config)
    grid = PromptGrid(grid)
    nodes = partitions(grid, cfg.clients)
    records = []
    for seed in range(cfg.seeds):
        for algo in cfg.algorithms():
            records.append(run_algorithm(grid, cfg, algo, seed, nodes))
            if cfg.result_path:  # after each record: a stopped run keeps what finished
                write_json(Path(cfg.result_path), {"records": records})


class PromptGrid(Grid):
    """The run's grid, polling for replies from 10 ms, backing off to 0.5 s. In a deployment
    Flower's grid (HttpGrid) sleeps a fixed 3 s between polls, longer than a small round."""

    def __init__(self, grid: Grid, first: float = 0.01, longest: float = 0.5):
        self.grid, self.first, self.longest = grid, first, longest

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies, pause = [], self.first
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(pause)
                pause = min(pause * 2, self.longest)
        return replies


def partitions(grid: Grid, clients: int, timeout: float = 300) -> dict[int, int]:
    """Wait for `clients` nodes and ask each which partition it holds: partition id -> node."""
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(ids)} of {clients} SuperNodes connected in {timeout} s")
        time.sleep(1)
    asks = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
            for n in ids]
    replies = grid.send_and_receive(asks, timeout=timeout)
    return checked({int(r.content["partition"]["id"]): r.metadata.src_node_id for r in replies},
                   clients)


def checked(nodes: dict[int, int], clients: int) -> dict[int, int]:
    """`nodes` (partition id -> node), if the nodes hold exactly partitions 0..clients-1."""
    if sorted(nodes) != list(range(clients)):
        raise RuntimeError(f"the SuperNodes hold partitions {sorted(nodes)}, expected 0.."
                           f"{clients - 1} (--node-config 'partition-id=I num-partitions=N')")
    return nodes


@client_app.query()
def which_partition(message: Message, context: Context) -> Message:
    partition = ConfigRecord({"id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"partition": partition}), reply_to=message)


def run_algorithm(grid: Grid, cfg: FedConfig, algo: str, seed: int,
                  nodes: dict[int, int]) -> dict:
    """One algorithm for `cfg.rounds` rounds. Every round reports the global model's test
    accuracy and its mean personalised accuracy (each client's label mix); FedD2S has no
    global model, and its accuracy is the clients' mean personalised accuracy."""
    model = new_model(cfg, seed)
    test = test_data(cfg)
    counts = all_label_counts(cfg, seed)

    def scores(m) -> tuple[float, list[float]]:
        logits = predict_logits(m, test.x)
        per_class = per_class_accuracy(logits.argmax(1), test.y, m.spec.num_classes)
        return metrics(logits, test.y)["acc"], [personal_accuracy(per_class, c) for c in counts]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_state(model, arrays.to_torch_state_dict())
        acc, personal = scores(model)
        return MetricRecord({"acc": acc, "personal-acc": sum(personal) / len(personal)})

    initial_acc, initial_personal = scores(model)
    strategy = make_strategy(algo, cfg, model, seed, nodes, dict(enumerate(initial_personal)))
    t0 = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state_of(model)),
                            num_rounds=cfg.rounds,
                            train_config=ConfigRecord({"algo": algo, "seed": seed}),
                            evaluate_fn=None if algo == "fedd2s" else evaluate)
    seconds = time.perf_counter() - t0
    rounds = range(1, cfg.rounds + 1)
    trained = result.train_metrics_clientapp
    if algo == "fedd2s":
        personal = [float(trained[r]["personal-acc"]) for r in rounds]
        acc, metric = personal, "personal"
    else:
        evaluated = result.evaluate_metrics_serverapp
        acc = [float(evaluated[r]["acc"]) for r in rounds]
        personal = [float(evaluated[r]["personal-acc"]) for r in rounds]
        metric = "global"
    return {"algo": algo, "seed": seed, "metric": metric, "acc_by_round": acc, "acc": acc[-1],
            "initial_acc": initial_acc if metric == "global"
            else sum(initial_personal) / len(initial_personal),
            "personal_acc_by_round": personal, "personal_acc": personal[-1],
            "bytes_sent_by_round": [strategy.bytes_sent.get(r, 0) for r in rounds],
            "bytes_received_by_round": [strategy.bytes_received.get(r, 0) for r in rounds],
            "train_loss_by_round": [float(trained[r]["train-loss"]) if r in trained else None
                                    for r in rounds],
            "seconds": round(seconds, 2)}


@client_app.train()
def train(message: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one core per client: the simulation runs clients side by side
    cfg = FedConfig.from_run_config(context.run_config)
    client = int(context.node_config["partition-id"])
    config = message.content["config"]
    algo, seed, server_round = config["algo"], int(config["seed"]), int(config["server-round"])
    x, y = client_data(cfg, seed, client)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{algo}/{seed}/{client}/{server_round}"
                                                   .encode()))
    opts = LocalOptions(cfg.local_steps, cfg.batch_size, cfg.lr, cfg.momentum,
                        float(config.get("proximal-mu", 0.0)))
    counts = all_label_counts(cfg, seed)[client]
    metrics = {"num-examples": len(y), "label-counts": [int(c) for c in counts],
               "partition": client}
    if algo == "fedd2s":
        content = _train_personal(message, context, cfg, seed, x, y, opts, gen, metrics)
    else:
        model = new_model(cfg, seed)
        load_state(model, message.content["arrays"].to_torch_state_dict())
        term = None
        if "generator" in message.content:
            g = fedgen.FeatureGenerator(model.spec.num_classes, head_of(model).in_features)
            g.load_state_dict(message.content["generator"].to_torch_state_dict())
            term = FedGenTerm(g.eval(), torch.tensor(list(config["fedgen-classes"])),
                              float(config["fedgen-alpha"]), float(config["fedgen-beta"]))
        metrics["train-loss"] = local_train(model, x, y, opts, gen, prox=algo == "fedprox",
                                            fedgen_term=term)["loss"]
        content = {"arrays": ArrayRecord(state_of(model))}
    content["metrics"] = MetricRecord(metrics)
    return Message(content=RecordDict(content), reply_to=message)


def _train_personal(message: Message, context: Context, cfg: FedConfig, seed: int,
                    x: torch.Tensor, y: torch.Tensor, opts: LocalOptions, gen: torch.Generator,
                    metrics: dict) -> dict:
    """A FedD2S client: its own model lives in the node's state between rounds (and between
    the run's seeds, under its own key); it distils from the server's head when one is sent,
    then uploads representations and soft labels and scores itself on its label mix."""
    config = message.content["config"]
    key = f"fedd2s-model-{seed}"
    model = new_model(cfg, seed)
    if key in context.state:
        load_state(model, context.state[key].to_torch_state_dict())
    split, weight = int(config["d2s-split"]), float(config["d2s-kd"])
    temperature = float(config["d2s-temperature"])
    term = None
    if weight > 0:
        head = fedd2s.layers(new_model(cfg, seed))[split:]
        head.load_state_dict(message.content["arrays"].to_torch_state_dict())
        term = D2STerm(head, split, weight, temperature)
    metrics["train-loss"] = local_train(model, x, y, opts, gen, d2s_term=term)["loss"]
    context.state[key] = ArrayRecord(state_of(model))
    z, idx, soft = fedd2s.upload(model, split, x, int(config["d2s-upload"]), temperature, gen)
    test = test_data(cfg)
    counts = torch.tensor(metrics["label-counts"])
    mine = torch.isin(test.y, torch.nonzero(counts).flatten())  # only the classes it holds count
    pred = predict_logits(model, test.x[mine]).argmax(1)
    per_class = per_class_accuracy(pred, test.y[mine], len(counts))
    metrics["personal-acc"] = personal_accuracy(per_class, counts)
    return {"upload": ArrayRecord({"z": z, "y": y[idx], "soft": soft})}

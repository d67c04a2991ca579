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
from dfkd.fed import fedgen
from dfkd.fed.local import FedGenTerm, LocalOptions, local_train
from dfkd.fed.model_parts import head_of, load_state, state_of
from dfkd.fed.strategy import make_strategy
from dfkd.fed.task import FedConfig, client_data, new_model, test_data
from dfkd.io import write_json

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def run_federation(grid: Grid, context: Context) -> None:
    cfg = FedConfig.from_run_config(context.run_config)
    nodes = partitions(grid, cfg.clients)
    records = []
    for seed in range(cfg.seeds):
        for algo in cfg.algorithms():
            records.append(run_algorithm(grid, cfg, algo, seed, nodes))
            if cfg.result_path:  # after each record: a stopped run keeps what finished
                write_json(Path(cfg.result_path), {"records": records})


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
    nodes = {int(r.content["partition"]["id"]): r.metadata.src_node_id for r in replies}
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
    model = new_model(cfg, seed)
    test = test_data(cfg)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_state(model, arrays.to_torch_state_dict())
        return MetricRecord({"acc": metrics(predict_logits(model, test.x), test.y)["acc"]})

    strategy = make_strategy(algo, cfg, model, seed, nodes)
    t0 = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state_of(model)),
                            num_rounds=cfg.rounds,
                            train_config=ConfigRecord({"algo": algo, "seed": seed}),
                            evaluate_fn=evaluate)
    seconds = time.perf_counter() - t0
    rounds = range(1, cfg.rounds + 1)
    acc = [float(result.evaluate_metrics_serverapp[r]["acc"]) for r in rounds]
    return {"algo": algo, "seed": seed, "acc_by_round": acc, "acc": acc[-1],
            "initial_acc": float(result.evaluate_metrics_serverapp[0]["acc"]),
            "bytes_sent_by_round": [strategy.bytes_sent.get(r, 0) for r in rounds],
            "bytes_received_by_round": [strategy.bytes_received.get(r, 0) for r in rounds],
            "train_loss_by_round": [float(result.train_metrics_clientapp[r]["train-loss"])
                                    if r in result.train_metrics_clientapp else None
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
    model = new_model(cfg, seed)
    load_state(model, message.content["arrays"].to_torch_state_dict())
    gen = torch.Generator().manual_seed(zlib.crc32(f"{algo}/{seed}/{client}/{server_round}"
                                                   .encode()))
    term = None
    if "generator" in message.content:
        g = fedgen.FeatureGenerator(model.spec.num_classes, head_of(model).in_features)
        g.load_state_dict(message.content["generator"].to_torch_state_dict())
        term = FedGenTerm(g.eval(), torch.tensor(list(config["fedgen-classes"])),
                          float(config["fedgen-alpha"]), float(config["fedgen-beta"]))
    opts = LocalOptions(cfg.local_steps, cfg.batch_size, cfg.lr, cfg.momentum,
                        float(config.get("proximal-mu", 0.0)))
    stats = local_train(model, x, y, opts, gen, prox=algo == "fedprox", fedgen_term=term)
    counts = torch.bincount(y, minlength=model.spec.num_classes)
    reply = RecordDict({"arrays": ArrayRecord(state_of(model)),
                        "metrics": MetricRecord({"num-examples": len(y),
                                                 "train-loss": stats["loss"],
                                                 "label-counts": [int(c) for c in counts]})})
    return Message(content=reply, reply_to=message)

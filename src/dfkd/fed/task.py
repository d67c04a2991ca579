"""What the server and every client of a federation agree on: the run's settings, the model,
and how the training split is cut among clients. Both sides rebuild these from the Flower run
config, so a client needs only its partition id and the dataset files."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from dfkd.config import option
from dfkd.data import fit_to_input, load_dataset
from dfkd.errors import DfkdError
from dfkd.evaluate import EvalData
from dfkd.fed.partition import dirichlet_split, label_counts
from dfkd.models.classifier import Classifier, InputSpec, new_classifier
from dfkd.models.registry import model_input_shape

ALGORITHMS = ("fedavg", "fedprox", "fedgen", "fedftg", "fedd2s")
_DEFAULT_MODEL = {"digits": "digits_cnn_quarter", "mnist": "lenet5", "fashion-mnist": "lenet5"}


@dataclass
class FedConfig:
    """Everything `dfkd fed` needs; flat, because it travels as Flower's run config."""

    dataset: str = option("digits", "digits, mnist or fashion-mnist")
    data_root: str = option("", "where the dataset's files are")
    model: str = option("", "zoo model (default lenet5 for (fashion-)mnist, digits_cnn_quarter "
                        "for digits)")
    clients: int = option(10, "number of clients")
    alpha: float = option(0.1, "Dirichlet concentration of the label split (0.1: each client "
                          "holds one or two classes)")
    algos: str = option(",".join(ALGORITHMS), "comma-separated algorithms", flag="--algo")
    rounds: int = option(20, "federated rounds")
    fraction: float = option(0.5, "share of clients sampled each round")
    seeds: int = option(1, "seeds 0..S-1; each seed draws its own split and initialisation")
    local_steps: int = option(20, "client SGD steps per round (FedGen's: 20 of batch 32)")
    batch_size: int = option(32, "client minibatch")
    lr: float = option(0.01, "client SGD learning rate")
    momentum: float = option(0.0, "client SGD momentum (0: plain SGD, as FedGen's authors)")
    prox_mu: float = 0.01
    out: str = option("runs/fed", "run directory")
    superlink: str = option("", "HOST:PORT of a deployed SuperLink (default: Flower's "
                            "simulation engine)")
    result_path: str = ""  # set by the launcher: where the ServerApp writes its records

    def algorithms(self) -> list[str]:
        algos = [a.strip() for a in self.algos.split(",") if a.strip()]
        unknown = [a for a in algos if a not in ALGORITHMS]
        if unknown or not algos:
            raise DfkdError(f"unknown algorithm(s) {unknown or self.algos!r}; choose from "
                            f"{', '.join(ALGORITHMS)}")
        return algos

    def arch(self) -> str:
        if self.model:
            return self.model
        if self.dataset not in _DEFAULT_MODEL:
            raise DfkdError(f"no default model for dataset '{self.dataset}'; pass --model NAME")
        return _DEFAULT_MODEL[self.dataset]

    def to_run_config(self) -> dict:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config) -> FedConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in dict(run_config).items()}
        return cls(**{k: v for k, v in values.items() if k in names})


@functools.lru_cache(maxsize=4)
def _split(dataset: str, data_root: str, split: str):
    return load_dataset(dataset, split, root=data_root or None)


def _spec(cfg: FedConfig) -> InputSpec:
    """The model's input: the zoo model's shape, the training split's normalization."""
    data = _split(cfg.dataset, cfg.data_root, "train")
    return InputSpec(model_input_shape(cfg.arch()), data.mean, data.std, data.num_classes,
                     cfg.dataset)


def new_model(cfg: FedConfig, seed: int) -> Classifier:
    """The federation's model, initialised from `seed` (every algorithm of a seed starts from
    the same weights)."""
    spec = _spec(cfg)
    torch.manual_seed(seed)
    return new_classifier(cfg.arch(), spec)


@functools.lru_cache(maxsize=8)
def _fitted(dataset: str, data_root: str, model: str, split: str) -> EvalData:
    cfg = FedConfig(dataset=dataset, data_root=data_root, model=model)
    data = _split(dataset, data_root, split)
    return EvalData(dataset, fit_to_input(data.images, _spec(cfg).shape, name=dataset),
                    data.labels)


def _data(cfg: FedConfig, split: str) -> EvalData:
    return _fitted(cfg.dataset, cfg.data_root, cfg.model, split)


def test_data(cfg: FedConfig) -> EvalData:
    """The evaluation split (reports only), fitted to the model's input."""
    return _data(cfg, "test")


def client_parts(cfg: FedConfig, seed: int) -> list[torch.Tensor]:
    return _parts(cfg.dataset, cfg.data_root, cfg.model, cfg.clients, cfg.alpha, seed)


@functools.lru_cache(maxsize=8)
def _parts(dataset: str, data_root: str, model: str, clients: int, alpha: float, seed: int
           ) -> list[torch.Tensor]:
    return dirichlet_split(_fitted(dataset, data_root, model, "train").y, clients, alpha, seed)


def client_data(cfg: FedConfig, seed: int, client: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and labels of one client's share of the training split under `seed`."""
    if not 0 <= client < cfg.clients:
        raise DfkdError(f"partition id {client} is outside 0..{cfg.clients - 1}: the SuperNodes' "
                        f"num-partitions must equal --clients")
    train = _data(cfg, "train")
    idx = client_parts(cfg, seed)[client]
    return train.x[idx], train.y[idx]


def all_label_counts(cfg: FedConfig, seed: int) -> torch.Tensor:
    return label_counts(_data(cfg, "train").y, client_parts(cfg, seed),
                        _spec(cfg).num_classes)

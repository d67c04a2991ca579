"""A teacher that only answers queries: the client side of `dfkd serve` (or any API that speaks
dfkd.blackbox.wire), metered against a query budget.

`BlackBoxTeacher` looks like a `Classifier` to the engine (an input spec, pixels in, logits out)
but has no weights, no gradients and no layers. Its "logits" are recovered from the answer's
probabilities (`recovered_logits`): exact up to a constant when the API answers with them. Every
image sent counts as one query once its answer arrives; a request that fails is retried with
exponential backoff and counted once, when it succeeds. The `train` stream counts against the
budget; the `eval` stream (the teacher's accuracy, for the report) is counted apart. With a query
log (dfkd.blackbox.query_log) a replayed question is answered from the log for free.
"""

from __future__ import annotations

import contextlib
import json
import time

import torch
from torch import nn

from dfkd.blackbox.query_log import QueryLog, digest
from dfkd.blackbox.wire import NPY, answer_probs, api_info, encode_inputs, model_answer
from dfkd.errors import DfkdError
from dfkd.io import write_json
from dfkd.models.classifier import Classifier, InputSpec

STREAMS = ("train", "eval")


class QueryBudgetSpent(Exception):
    """The next request would pass --query-budget: the run ends where it stands."""


class TeacherUnavailable(DfkdError):
    """The API kept failing; what it answered before is in the query log."""


def recovered_logits(probs: torch.Tensor) -> torch.Tensor:
    """log p less its mean over the classes (DFME's 'mean' correction): the teacher's logits up
    to the constant a softmax ignores, so KD at any temperature sees exactly its distribution."""
    logp = probs.float().clamp_min(1e-12).log()
    return logp - logp.mean(1, keepdim=True)


def is_black_box(teacher) -> bool:
    return isinstance(teacher, BlackBoxTeacher)


class LocalAPI:
    """A loaded model behind the same answers as `dfkd serve`, in process (tests, benchmarks)."""

    def __init__(self, model: Classifier, access: str = "soft", topk: int = 5,
                 max_batch: int = 1024):
        self.model, self.access, self.topk, self.max_batch = model, access, topk, max_batch
        self.url = f"local:{model.arch}"

    def info(self) -> dict:
        return api_info(self.model, self.access, self.topk, self.max_batch)

    def predict(self, x: torch.Tensor) -> dict:
        return model_answer(self.model, x, self.access, self.topk)


class HttpAPI:
    """The API at `url`, over HTTP (httpx). Timeouts, connection errors, 429 and 5xx are retried
    `retries` times with exponential backoff; another 4xx is the caller's mistake and fails at
    once with the server's reason."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 5, backoff: float = 0.5,
                 sleep=time.sleep, transport=None):
        try:
            import httpx
        except ImportError:
            raise DfkdError("black-box teachers over HTTP need httpx; install it with pip "
                            "install 'dfkd[serve]'") from None
        self.url, self.retries, self.backoff, self.sleep = url.rstrip("/"), retries, backoff, sleep
        self.httpx = httpx
        self.client = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def predict(self, x: torch.Tensor) -> dict:
        return self._request("POST", "/v1/predict", content=encode_inputs(x),
                             headers={"content-type": NPY})

    def _request(self, method: str, path: str, **kwargs) -> dict:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self.client.request(method, path, **kwargs)
            except self.httpx.TransportError as e:
                problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                continue
            if r.status_code < 400:
                try:
                    return r.json()
                except ValueError:
                    raise TeacherUnavailable(f"the teacher API at {self.url} answered {path} "
                                             "with something that is not JSON") from None
            reason = _reason(r)
            if r.status_code < 500 and r.status_code != 429:
                raise DfkdError(f"the teacher API at {self.url} refused {method} {path} "
                                f"({r.status_code}): {reason}")
            problem = f"HTTP {r.status_code}: {reason}"
        raise TeacherUnavailable(f"the teacher API at {self.url} failed {self.retries + 1} "
                                 f"times in a row ({problem}); rerun with --resume when it is "
                                 "back: answers already paid for are replayed from the query log")


def _reason(response) -> str:
    try:
        return str(response.json().get("error", response.text))[:300]
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase


class BlackBoxTeacher(nn.Module):
    """The engine's view of one API, or of several as one teacher: `forward` takes [0, 1]
    pixels and returns recovered logits of the mean of the APIs' probabilities (for top-1 APIs:
    the share of votes), the building block of distilling many black boxes into one student
    (BiDf-MKD). Each image sent to each API is one query.

    The spec's mean and std are 0.5: methods that work in a normalized input space (noise,
    generators) then work in [-1, 1], the teacher's own normalization being invisible."""

    arch = "black-box"

    def __init__(self, apis, query_budget: int = 0):
        super().__init__()
        self.apis = list(apis) if isinstance(apis, (list, tuple)) else [apis]
        infos = [_read_info(api) for api in self.apis]
        first = infos[0]
        for api, info in zip(self.apis[1:], infos[1:], strict=True):
            if info["identity"] != first["identity"]:
                raise DfkdError(f"the APIs of one teacher must take the same input and answer "
                                f"the same way: {self.apis[0].url} answers "
                                f"{first['identity']}, {api.url} {info['identity']}")
        shape, k = tuple(first["identity"]["input_shape"]), first["identity"]["num_classes"]
        self.access, self.topk = first["identity"]["access"], first["identity"]["topk"]
        self.max_batch = min(info["max_batch"] for info in infos)
        c = shape[0]
        self.spec = InputSpec(shape, (0.5,) * c, (0.5,) * c, k, first["dataset"])
        self.register_buffer("mean", torch.full((1, c, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, c, 1, 1), 0.5), persistent=False)
        self.url, self.budget = ",".join(api.url for api in self.apis), query_budget
        self.calls = dict.fromkeys(STREAMS, 0)  # requests asked per stream (log positions)
        self.paid = dict.fromkeys(STREAMS, 0)  # images the APIs answered per stream
        self.replayed = 0  # images answered from the log
        self.stream = "train"
        self.logs: dict[tuple[str, int], QueryLog] = {}  # (stream, API) -> its log

    @property
    def net(self):
        raise DfkdError("a black-box teacher has no layers or weights to reach into")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def open_log(self, folder) -> None:
        """Keep paid answers in `folder`, one log per stream and API; APIs that answer otherwise
        than those the log came from (other inputs, classes, access level or number) are
        refused."""
        folder.mkdir(parents=True, exist_ok=True)
        seen, path = self.identity(), folder / "api.json"
        if path.exists() and json.loads(path.read_text()) != seen:
            raise DfkdError(f"the API at {self.url} answers {seen}, but this run's queries came "
                            f"from one that answers {path.read_text()}; resume against that one")
        write_json(path, seen)
        for s in STREAMS:
            for i in range(len(self.apis)):
                self.logs[s, i] = QueryLog(folder, s if i == 0 else f"{s}-{i}")
            self.paid[s] = sum(self.logs[s, i].paid for i in range(len(self.apis)))

    @contextlib.contextmanager
    def metered(self, stream: str):
        """Queries inside the block go to `stream` (train: against the budget; eval: apart)."""
        before, self.stream = self.stream, stream
        try:
            yield self
        finally:
            self.stream = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu()
        probs = torch.cat([self._ask(x[i:i + self.max_batch])
                           for i in range(0, len(x), self.max_batch)])
        return recovered_logits(probs).to(self.mean.device)

    def _ask(self, x: torch.Tensor) -> torch.Tensor:
        """One request to every API (or its log), at the stream's next position."""
        s, n = self.stream, len(x)
        position, dig = self.calls[s], digest(x)
        logged = [log.get(position, dig) if (log := self.logs.get((s, i))) else None
                  for i in range(len(self.apis))]
        cost = n * sum(answer is None for answer in logged)
        if s == "train" and self.budget and cost and self.paid[s] + cost > self.budget:
            raise QueryBudgetSpent(f"{self.paid[s]} of {self.budget} queries spent; the next "
                                   f"request asks {cost}")
        answers = []
        for i, (api, answer_) in enumerate(zip(self.apis, logged, strict=True)):
            if answer_ is None:
                answer_ = self._paid_answer(api, x)
                self.paid[s] += n
                if (s, i) in self.logs:
                    self.logs[s, i].append(position, dig, answer_)
            else:
                self.replayed += n
            answers.append(answer_)
        self.calls[s] += 1
        return torch.stack(answers).mean(0)

    def _paid_answer(self, api, x: torch.Tensor) -> torch.Tensor:
        ans = api.predict(x)
        try:
            return answer_probs(ans, self.access, self.spec.num_classes, len(x))
        except (KeyError, TypeError, ValueError) as e:
            raise TeacherUnavailable(f"the teacher API at {api.url} answered a malformed "
                                     f"batch: {e}") from None

    def identity(self) -> dict:
        return {"input_shape": list(self.spec.shape), "num_classes": self.spec.num_classes,
                "access": self.access, "topk": self.topk, "apis": len(self.apis)}

    def query_state(self) -> dict:
        return {"calls": self.calls["train"], "paid": self.paid["train"]}

    def load_query_state(self, state: dict) -> None:
        """Back to a checkpoint: its position in the train stream; what was paid comes from the
        logs when there are some (they hold what the checkpoint could not know)."""
        self.calls["train"] = int(state["calls"])
        if not self.logs:
            self.paid["train"] = int(state["paid"])

    def report(self) -> dict:
        return {"teacher_access": self.access, "teacher_apis": len(self.apis),
                "queries": self.paid["train"], "query_budget": self.budget or None,
                "eval_queries": self.paid["eval"], "replayed_queries": self.replayed}


def _read_info(api) -> dict:
    info = api.info()
    try:
        identity = {"input_shape": [int(s) for s in info["input_shape"]],
                    "num_classes": int(info["num_classes"]), "access": str(info["access"]),
                    "topk": info.get("topk")}
        return {"identity": identity, "max_batch": int(info["max_batch"]),
                "dataset": info.get("dataset")}
    except (KeyError, TypeError, ValueError):
        raise DfkdError(f"the teacher API at {api.url} gave no usable /v1/info") from None


def connect(urls: str) -> BlackBoxTeacher:
    """The teacher behind one URL, or behind several (comma-separated) as one."""
    return BlackBoxTeacher([HttpAPI(url.strip()) for url in urls.split(",") if url.strip()])


@contextlib.contextmanager
def metered(teacher, stream: str):
    """`teacher.metered(stream)` for a black box; nothing for a white-box teacher."""
    with teacher.metered(stream) if is_black_box(teacher) else contextlib.nullcontext():
        yield

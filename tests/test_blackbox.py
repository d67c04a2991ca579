"""Black-box teachers: the wire format, `dfkd serve`'s answers and refusals, the client's retries
and metering, the query log, and distillation from an API on loopback, killed and resumed."""

import contextlib
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from safetensors.torch import load_file

from dfkd.blackbox.query_log import QueryLog, digest
from dfkd.blackbox.server import create_app
from dfkd.blackbox.teacher import (
    BlackBoxTeacher,
    HttpAPI,
    LocalAPI,
    QueryBudgetSpent,
    TeacherUnavailable,
    recovered_logits,
)
from dfkd.blackbox.wire import NPY, BadRequest, answer, answer_probs, decode_inputs, encode_inputs
from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine import distill as engine
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.machine import free_port
from dfkd.models.classifier import load_classifier
from dfkd.synthesis.dfme import DFME


@pytest.fixture(scope="module")
def model(digits_teacher):
    return load_classifier(digits_teacher).eval()


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on a free loopback port, in a thread of this process."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ws="none"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# ---- wire format -------------------------------------------------------------------------------

def test_inputs_round_trip_and_bad_ones_get_a_status_and_a_reason():
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(decode_inputs(encode_inputs(x), (1, 8, 8), 4), x)
    cases = [(b"not an array", 400, "not a .npy array"),
             (_npy(np.zeros((2, 1, 8, 8), np.float64)), 422, "dtype float64"),
             (_npy(np.zeros((2, 1, 9, 8), np.float32)), 422, "expected Nx1x8x8"),
             (_npy(np.zeros((0, 1, 8, 8), np.float32)), 422, "empty"),
             (_npy(np.zeros((5, 1, 8, 8), np.float32)), 413, "at most 4"),
             (_npy(np.full((1, 1, 8, 8), 1.5, np.float32)), 422, r"in \[0, 1\]"),
             (_npy(np.full((1, 1, 8, 8), np.nan, np.float32)), 422, "finite")]
    for body, status, reason in cases:
        with pytest.raises(BadRequest, match=reason) as e:
            decode_inputs(body, (1, 8, 8), 4)
        assert e.value.status == status


def test_each_access_level_reveals_what_it_says_and_is_read_back():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert torch.equal(answer_probs(answer(probs, "soft", 2), "soft", 3, 2), probs)
    top1 = answer(probs, "top1", 2)
    assert top1 == {"classes": [1, 0]}
    assert torch.equal(answer_probs(top1, "top1", 3, 2), torch.tensor([[0., 1, 0], [1, 0, 0]]))
    topk = answer(probs, "topk", 2)
    assert topk["classes"] == [[1, 2], [0, 2]]
    # the top 2 as given, the rest of the mass on the one class left
    assert torch.allclose(answer_probs(topk, "topk", 3, 2), probs)
    with pytest.raises(ValueError):
        answer_probs({"classes": [1, 7]}, "top1", 3, 2)
    with pytest.raises(ValueError):
        answer_probs({"probs": [[1.0]]}, "soft", 3, 2)


def test_recovered_logits_give_the_teachers_softmax_at_any_temperature():
    logits = torch.randn(4, 10) * 3
    rec = recovered_logits(logits.softmax(1))
    assert torch.allclose(rec.mean(1), torch.zeros(4), atol=1e-5)
    for t in (1.0, 4.0, 20.0):
        assert torch.allclose((rec / t).softmax(1), (logits / t).softmax(1), atol=1e-5)


# ---- the server --------------------------------------------------------------------------------

def test_the_server_answers_at_its_access_level_and_refuses_bad_requests(model):
    x = torch.rand(5, *model.spec.shape)
    with torch.no_grad():
        expected = model(x).softmax(1)
    npy = {"content-type": NPY}
    with serving(create_app(model, "soft", max_batch=8)) as url, httpx.Client(base_url=url) as c:
        info = c.get("/v1/info").json()
        assert info == {"input_shape": [1, 8, 8], "num_classes": 10, "access": "soft",
                        "topk": None, "max_batch": 8, "dataset": "digits"}
        r = c.post("/v1/predict", content=encode_inputs(x), headers=npy)
        assert r.status_code == 200
        assert torch.allclose(torch.tensor(r.json()["probs"]), expected, atol=1e-6)
        refusals = [
            (c.post("/v1/predict", json={"inputs": [1]}), 415, "application/x-npy"),
            (c.post("/v1/predict", content=encode_inputs(torch.rand(9, 1, 8, 8)), headers=npy),
             413, "at most 8"),
            (c.post("/v1/predict", content=b"x" * 10**6, headers=npy), 413, "bytes"),
            (c.post("/v1/predict", content=encode_inputs(torch.rand(2, 3, 8, 8)), headers=npy),
             422, "expected Nx1x8x8"),
            (c.post("/v1/predict", content=b"junk", headers=npy), 400, "not a .npy"),
        ]
        for response, status, reason in refusals:
            assert response.status_code == status
            assert reason in response.json()["error"]
        assert c.get("/v1/predict").status_code == 405
        assert c.get("/v2/anything").status_code == 404
        assert c.post("/v1/predict", content=encode_inputs(x), headers=npy).status_code == 200
    with serving(create_app(model, "top1")) as url:
        r = httpx.post(f"{url}/v1/predict", content=encode_inputs(x), headers=npy)
        assert r.json() == {"classes": expected.argmax(1).tolist()}
    with pytest.raises(DfkdError, match="unknown access .logits.; choose one of"):
        create_app(model, "logits")


def test_dfkd_serve_refuses_a_bad_access_level_and_quantize_a_url(capsys):
    from dfkd.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--model", "m", "--access", "all"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["quantize", "--model", "http://127.0.0.1:9", "--out", "x"]) == 2
    assert "needs the model's weights" in capsys.readouterr().err


# ---- the client: retries and metering ----------------------------------------------------------

class Flaky:
    """A transport that fails in the given ways, then answers as the model would."""

    def __init__(self, model, failures):
        self.api, self.failures, self.posts = LocalAPI(model), list(failures), 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/info":
            return httpx.Response(200, json=self.api.info())
        self.posts += 1
        if self.failures:
            failure = self.failures.pop(0)
            if failure == "timeout":
                raise httpx.ReadTimeout("timed out", request=request)
            return httpx.Response(failure, json={"error": "busy"})
        x = decode_inputs(request.content, (1, 8, 8), 1024)
        return httpx.Response(200, json=self.api.predict(x))


def _http(model, failures, retries=3):
    flaky, slept = Flaky(model, failures), []
    api = HttpAPI("http://api", retries=retries, backoff=0.5, sleep=slept.append,
                  transport=httpx.MockTransport(flaky))
    return api, flaky, slept


def test_timeouts_and_5xx_are_retried_with_backoff_and_counted_once(model):
    api, flaky, slept = _http(model, ["timeout", 503, 429])
    teacher = BlackBoxTeacher(api)
    x = torch.rand(6, 1, 8, 8)
    out = teacher(x)
    with torch.no_grad():
        assert torch.allclose(out.softmax(1), model(x).softmax(1), atol=1e-5)
    assert flaky.posts == 4 and slept == [0.5, 1.0, 2.0]
    assert teacher.paid["train"] == 6  # the three failed attempts cost nothing


def test_a_client_error_fails_at_once_and_a_dead_api_after_its_retries(model):
    api, flaky, slept = _http(model, [400])
    with pytest.raises(DfkdError, match=r"refused POST /v1/predict \(400\): busy"):
        BlackBoxTeacher(api)(torch.rand(2, 1, 8, 8))
    assert flaky.posts == 1 and slept == []
    api, flaky, slept = _http(model, [500] * 10, retries=2)
    with pytest.raises(TeacherUnavailable, match="failed 3 times in a row .*--resume"):
        BlackBoxTeacher(api)(torch.rand(2, 1, 8, 8))


class Counting(LocalAPI):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sent = []

    def predict(self, x):
        self.sent.append(len(x))
        return super().predict(x)


def test_requests_are_split_at_max_batch_and_stop_at_the_budget(model):
    api = Counting(model, max_batch=4)
    teacher = BlackBoxTeacher(api, query_budget=12)
    teacher(torch.rand(10, 1, 8, 8))
    assert api.sent == [4, 4, 2] and teacher.paid["train"] == 10
    with pytest.raises(QueryBudgetSpent, match="10 of 12 queries spent"):
        teacher(torch.rand(3, 1, 8, 8))
    with teacher.metered("eval"):  # evaluation is counted apart, never refused
        teacher(torch.rand(8, 1, 8, 8))
    assert teacher.paid == {"train": 10, "eval": 8}


def test_a_logged_question_is_answered_from_the_log_for_free(model, tmp_path):
    x1, x2 = torch.rand(5, 1, 8, 8), torch.rand(5, 1, 8, 8)
    first = BlackBoxTeacher(Counting(model))
    first.open_log(tmp_path)
    a1, a2 = first(x1), first(x2)
    again_api = Counting(model)
    again = BlackBoxTeacher(again_api, query_budget=10)
    again.open_log(tmp_path)
    assert again.paid["train"] == 10  # what the log says was paid
    assert torch.equal(again(x1), a1) and torch.equal(again(x2), a2)
    assert again_api.sent == [] and again.replayed == 10
    with pytest.raises(QueryBudgetSpent):  # a new question is paid, and the budget is spent
        again(torch.rand(1, 1, 8, 8))


def test_a_record_cut_short_by_a_kill_is_dropped(tmp_path):
    log = QueryLog(tmp_path, "train")
    p = torch.rand(3, 10).softmax(1)
    x = torch.rand(3, 1, 8, 8)
    log.append(0, digest(x), p)
    log.append(1, digest(x), p)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-7])
    reopened = QueryLog(tmp_path, "train")
    assert reopened.paid == 3 and torch.equal(reopened.get(0, digest(x)), p)
    assert reopened.get(1, digest(x)) is None and reopened.get(0, b"0" * 16) is None
    assert reopened.path.stat().st_size == len(data) // 2


def test_several_apis_answer_as_one_teacher_and_each_is_metered(model, tmp_path):
    from dfkd.models.classifier import new_classifier

    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = new_classifier("digits_cnn_quarter", model.spec).eval()
    apis = [Counting(model), Counting(other)]
    teacher = BlackBoxTeacher(apis, query_budget=30)
    teacher.open_log(tmp_path)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        mean = (model(x).softmax(1) + other(x).softmax(1)) / 2
    assert torch.allclose(teacher(x).softmax(1), mean, atol=1e-5)
    assert teacher.paid["train"] == 12 and [a.sent for a in apis] == [[6], [6]]
    assert teacher.report()["teacher_apis"] == 2
    with pytest.raises(QueryBudgetSpent, match="the next request asks 24"):
        teacher(torch.rand(12, 1, 8, 8))
    again = BlackBoxTeacher([Counting(model), Counting(other)])
    again.open_log(tmp_path)
    assert torch.equal(again(x), teacher(x)) and again.replayed == 12
    with pytest.raises(DfkdError, match="same input and answer the same way"):
        BlackBoxTeacher([LocalAPI(model), LocalAPI(model, access="top1")])
    with pytest.raises(DfkdError, match="came from one that answers"):
        BlackBoxTeacher(LocalAPI(model)).open_log(tmp_path)  # one API where there were two


# ---- DFME --------------------------------------------------------------------------------------

def test_the_forward_difference_estimate_points_along_the_true_gradient():
    from dfkd.synthesis.dfme import forward_difference_gradient

    torch.manual_seed(0)
    w = torch.randn(2, 1, 4, 4)
    g = torch.randn(2, 1, 4, 4)
    m, eps = 4000, 1e-3
    u = torch.randn(2, m, 1, 4, 4)
    u = u / u.flatten(2).norm(dim=2).view(2, m, 1, 1, 1)
    loss = lambda x: (x * w.unsqueeze(1)).flatten(2).sum(2)  # noqa: E731  per point, linear
    points = torch.cat([g.unsqueeze(1) + eps * u, g.unsqueeze(1)], dim=1)
    est = forward_difference_gradient(loss(points), u, eps, num_classes=1)
    # the true gradient of the mean loss over the 2 samples is w / 2
    cos = torch.nn.functional.cosine_similarity(est.flatten(), (w / 2).flatten(), dim=0)
    assert cos > 0.95 and torch.allclose(est.norm(), (w / 2).norm(), rtol=0.1)


def test_dfme_trains_its_generator_from_answers_alone(model):
    from dfkd.models.classifier import new_classifier

    api = Counting(model)
    teacher = BlackBoxTeacher(api)
    student = new_classifier("digits_cnn_quarter", model.spec)
    opts = DFME.Options(batch_size=8, nz=16, ngf=8, g_every=2, directions=2)
    synth = DFME(teacher, opts, seed=0)
    before = [p.clone() for p in synth.G.parameters()]
    batch = synth.synthesize(student, 0)
    assert api.sent == [8 * 3, 8]  # the G step's 3 points per image, then the batch
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.G.parameters(), strict=True))
    assert batch["x"].min() >= 0 and batch["x"].max() <= 1
    assert torch.allclose(batch["target_logits"].mean(1), torch.zeros(8), atol=1e-5)
    assert all(p.grad is None for p in student.parameters())
    with pytest.raises(DfkdError, match="bn_weight needs its BatchNorm"):
        DFME(teacher, DFME.Options(bn_weight=1.0), seed=0)


def test_dfme_replay_trains_on_remembered_answers_without_a_query(model):
    from dfkd.models.classifier import new_classifier

    api = Counting(model)
    student = new_classifier("digits_cnn_quarter", model.spec)
    opts = DFME.Options(batch_size=8, nz=16, ngf=8, g_every=1, replay=2, memory=12)
    synth = DFME(BlackBoxTeacher(api), opts, seed=0)
    fresh = synth.synthesize(student, 0)
    assert api.sent == [8 * 2, 8]
    replayed = [synth.synthesize(student, i) for i in (1, 2)]
    assert api.sent == [8 * 2, 8]  # no query for the two replayed batches
    for b in replayed:  # every replayed sample is a remembered one, with its answer
        assert len(b["x"]) == 8
        for x, t in zip(b["x"], b["target_logits"], strict=True):
            i = [k for k in range(8) if torch.allclose(fresh["x"][k], x, atol=1e-3)]
            assert i and torch.allclose(fresh["target_logits"][i[0]], t)
    synth.synthesize(student, 3)  # fresh again: a G step and a batch; the ring (12) wraps
    assert api.sent == [16, 8, 16, 8] and synth.remembered == 16
    again = DFME(BlackBoxTeacher(Counting(model)), opts, seed=0)
    again.load_state_dict(synth.state_dict())
    a, b = synth.synthesize(student, 4), again.synthesize(student, 4)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["target_logits"], b["target_logits"])
    with pytest.raises(DfkdError, match="replay must be >= 0"):
        DFME(BlackBoxTeacher(api), DFME.Options(replay=-1), seed=0)


def test_dfme_balanced_replay_draws_the_classes_evenly(model):
    opts = DFME.Options(batch_size=200, nz=16, ngf=8, replay=1, memory=1000, balanced=True)
    synth = DFME(BlackBoxTeacher(Counting(model)), opts, seed=0)
    answers = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)  # a memory of 90%, 9% and 1%
    synth.memory = {"x": torch.rand(1000, *model.spec.shape).half(),
                    "target_logits": torch.nn.functional.one_hot(answers, 10).float()}
    synth.remembered = 1000
    drawn = synth.replayed(torch.Generator().manual_seed(0))["target_logits"].argmax(1)
    counts = torch.bincount(drawn, minlength=3)[:3]
    # uniform draws would give about 180, 18 and 2; without replacement, so no sample twice
    assert counts.sum() == 200 and counts[1] >= 60 and counts[2] >= 8


def test_dfme_diversity_steers_g_toward_classes_the_student_rarely_sees(model):
    """The class-diversity gradient is the student's, white box: no query, no student grad,
    and a G step along it raises the entropy of the student's mean answer."""
    from dfkd.models.classifier import new_classifier

    api = Counting(model)
    student = new_classifier("digits_cnn_quarter", model.spec)
    synth = DFME(BlackBoxTeacher(api), DFME.Options(batch_size=32, nz=16, ngf=8), seed=0)
    g = synth.G(synth.latent(torch.Generator().manual_seed(1), 32)).detach()

    def entropy(g):
        with torch.no_grad():
            mean = student.eval()(synth.pixels(g)).softmax(1).mean(0)
        return -(mean * mean.log()).sum()

    grad = synth.diversity_gradient(student, g)
    assert api.sent == [] and all(p.grad is None for p in student.parameters())
    assert entropy(g - 0.5 * grad / grad.norm()) > entropy(g)
    with pytest.raises(DfkdError, match="diversity must be >= 0"):
        DFME(BlackBoxTeacher(api), DFME.Options(diversity=-1.0), seed=0)


# ---- distillation from an API on loopback ------------------------------------------------------

@pytest.fixture(scope="module")
def api_url(model):
    with serving(create_app(model, "soft")) as url:
        yield url


def _cfg(url, out, **kw):
    base = dict(teacher=TeacherArgs(path=url), method="dfme",
                method_options={"batch_size": 16, "nz": 16, "ngf": 8},
                student="digits_cnn_quarter", out=str(out), budget="30steps", device="cpu",
                eval_dataset="digits", eval_points=3, batch_size=16, checkpoint_seconds=0.0)
    base.update(kw)
    return DistillConfig(**base)


def test_distill_from_an_api_reports_its_queries_and_stops_at_the_budget(api_url, tmp_path):
    r = distill(_cfg(api_url, tmp_path / "a"), progress=False)
    # replay 4 (the default): 6 of the 30 student batches of 16 are fresh, and G steps once
    # every 5 fresh ones (2 steps of 16 images at 2 points each)
    assert r["queries"] == 6 * 16 + 2 * 16 * 2 and r["ended_by"] == "budget"
    assert r["teacher_access"] == "soft" and r["teacher_params"] is None
    assert r["eval_queries"] == 450 and r["teacher_acc"] > 0.9
    assert r["student_init"] == "random"
    r = distill(_cfg(api_url, tmp_path / "b", query_budget=100), progress=False)
    assert r["ended_by"] == "query budget" and r["queries"] <= 100 and r["steps"] < 30
    assert (tmp_path / "b" / "student.safetensors").exists()


def test_a_query_budget_that_ends_the_run_first_anneals_it_and_spreads_its_evaluations(
        api_url, tmp_path):
    r = distill(_cfg(api_url, tmp_path / "q", budget="10m", query_budget=400), progress=False)
    assert r["ended_by"] == "query budget"
    records = [json.loads(line) for line in open(tmp_path / "q" / "metrics.jsonl")]
    evals = [x["queries"] for x in records if "student_acc" in x]
    assert len(evals) == 4 and evals[0] == 0  # the student before any query, then thirds:
    assert 0 < evals[1] < evals[2] < evals[3] <= 400
    rates = [x["lr"] for x in records if "lr" in x]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.02  # from 0.1 toward 0


@pytest.mark.parametrize("replay", [0, 2])
def test_a_killed_run_resumes_exactly_and_never_pays_twice(api_url, tmp_path, monkeypatch,
                                                           replay):
    options = {"method_options": {"batch_size": 16, "nz": 16, "ngf": 8, "replay": replay}}
    full = distill(_cfg(api_url, tmp_path / "full", **options), progress=False)

    class Killed(BaseException):
        pass

    original, calls = engine.student_loss, {"n": 0}

    def loss_then_die(*a, **k):  # dies inside step 18, after its batch was paid for
        calls["n"] += 1
        if calls["n"] == 18:
            raise Killed
        return original(*a, **k)

    monkeypatch.setattr(engine, "student_loss", loss_then_die)
    cfg = _cfg(api_url, tmp_path / "killed", **options)
    with pytest.raises(Killed):
        distill(cfg, progress=False)
    monkeypatch.undo()
    resumed = distill(cfg, resume=True, progress=False)
    assert resumed["queries"] == full["queries"]  # the replayed step's batch came from the log
    if not replay:  # (with replay, the killed step's batch came from the memory)
        assert resumed["replayed_queries"] >= 16
    assert resumed["student_acc"] == full["student_acc"]
    a = load_file(str(tmp_path / "full" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw,message", [
    ({"method": "deepinv"}, "methods that can use it: db3kd, dfme, ideal, noise"),
    ({"student": ""}, "give --student NAME"),
    ({"loss": "at"}, "reads the teacher's layers"),
    ({"defense": "abd"}, "--defense abd needs the teacher's weights"),
    ({"student_init": "teacher"}, "no weights to start the student from"),
])
def test_what_needs_more_than_answers_is_refused_in_one_line(api_url, tmp_path, kw, message):
    with pytest.raises(DfkdError, match=message):
        distill(_cfg(api_url, tmp_path / "x", **kw), progress=False)


def test_a_run_resumes_against_the_api_at_a_new_address_but_not_another_api(api_url, model,
                                                                              tmp_path):
    cfg = _cfg(api_url, tmp_path / "r", budget="4steps")
    first = distill(cfg, progress=False)
    with serving(create_app(model, "soft")) as moved:
        again = distill(_cfg(moved, tmp_path / "r", budget="4steps"), resume=True,
                        progress=False)
    assert again["queries"] == first["queries"] and again["student_acc"] == first["student_acc"]
    with serving(create_app(model, "topk")) as other, \
            pytest.raises(DfkdError, match="came from one that answers"):
        distill(_cfg(other, tmp_path / "r", budget="4steps"), resume=True, progress=False)


# ---- DB3KD -------------------------------------------------------------------------------------

class Brightness(torch.nn.Module):
    """Class 1 where the mean pixel passes 0.5, else class 0: a boundary known exactly."""

    def forward(self, z):
        m = (z.flatten(1).mean(1) - 0.5) * 100
        return torch.stack([torch.zeros_like(m), m], dim=1)


def _brightness_teacher():
    from dfkd.models.classifier import Classifier, InputSpec

    return Classifier(Brightness(), InputSpec((1, 8, 8), (0.0,), (1.0,), 2), "brightness")


def test_boundary_logits_follow_the_reference_formula():
    from dfkd.synthesis.db3kd import boundary_logits

    d = torch.tensor([[7.0, 2.0, 4.0], [1.0, float("inf"), 0.5]])
    logits = boundary_logits(d, torch.tensor([0, 1]))
    assert torch.allclose(logits, torch.tensor([[0.75, 0.5, 0.25], [1.0, 3.0, 2.0]]))


def test_db3kd_finds_a_known_boundary_and_labels_by_decisions_alone():
    from dfkd.synthesis.db3kd import DB3KD

    teacher = BlackBoxTeacher(LocalAPI(_brightness_teacher(), access="top1"))
    synth = DB3KD(teacher, DB3KD.Options(bisections=12), seed=0)
    x = torch.full((1, 1, 8, 8), 0.25)
    theta = torch.full((1, 1, 8, 8), 1 / 8)  # unit norm; the mean rises 1/8 per unit
    assert abs(synth.first_flip(x, torch.tensor([0]), theta).item() - 2.0) < 4 * 2**-12
    assert synth.first_flip(x, torch.tensor([0]), -theta).isinf().all()  # never brighter
    # the segment to an anchor of class 1 crosses the boundary at mean 0.5
    pair = torch.cat([x, torch.full((1, 1, 8, 8), 0.75)])
    d = synth.class_distances(pair, torch.tensor([0, 1]))
    assert abs(d[0, 1].item() - 2.0) < 0.01 and abs(d[1, 0].item() - 2.0) < 0.01
    moved = synth.move_away(torch.full((1, 1, 8, 8), 0.45), torch.tensor([0]),
                            torch.Generator().manual_seed(0))
    assert moved.mean() < 0.45  # away from the boundary, still class 0


class Smoothness(torch.nn.Module):
    """Class 1 for an image whose neighbouring pixels differ little on average, else class 0:
    pixel-wise noise is almost never class 1."""

    def forward(self, z):
        m = (0.1 - (z[..., 1:] - z[..., :-1]).abs().flatten(1).mean(1)) * 100
        return torch.stack([torch.zeros_like(m), m], dim=1)


def test_db3kd_blobs_reach_a_class_the_reference_noise_misses():
    from dfkd.models.classifier import Classifier, InputSpec
    from dfkd.synthesis.base import balanced_targets
    from dfkd.synthesis.db3kd import DB3KD, blobs

    shapes = blobs((50, 3, 16, 16), torch.Generator().manual_seed(0))
    assert shapes.shape == (50, 3, 16, 16) and set(shapes.unique().tolist()) <= {0.0, 1.0}
    assert 0.05 < shapes.mean() < 0.7 and shapes.flatten(1).std(1).min() > 0  # never blank
    teacher = Classifier(Smoothness(), InputSpec((1, 16, 16), (0.0,), (1.0,), 2), "smooth")
    filled = {}
    for noise in ("reference", "mixed"):
        synth = DB3KD(teacher, DB3KD.Options(draws=12, noise=noise), seed=0)
        gen = torch.Generator().manual_seed(1)
        wanted = balanced_targets(40, 2, gen)
        _, y = synth.starting_points(wanted, gen)
        filled[noise] = int(((y == 1) & (wanted == 1)).sum())
    assert filled["mixed"] >= 18 and filled["reference"] <= 8
    flat = Classifier(torch.nn.Linear(5, 3), InputSpec((5,), (0.0,), (1.0,), 3), "lin")
    draws = DB3KD(flat, DB3KD.Options(), seed=0).noise(7, torch.Generator().manual_seed(0))
    assert draws.shape == (7, 5)  # no blobs without an image, and no broadcast into 4 dims
    with pytest.raises(DfkdError, match="unknown noise 'pink'; choose one of: mixed, reference"):
        DB3KD(teacher, DB3KD.Options(noise="pink"), seed=0)


@pytest.mark.parametrize("budget", ["20steps", "3s"])  # a wall clock crashed after round 1
def test_db3kd_distills_from_a_top1_api(model, tmp_path, budget):
    with serving(create_app(model, "top1")) as url:
        r = distill(_cfg(url, tmp_path / "d", method="db3kd", budget=budget,
                         method_options={"batch_size": 20, "moves": 1, "directions": 2,
                                         "anchors": 2, "bisections": 3}), progress=False)
    assert r["teacher_access"] == "top1" and r["queries"] > 0 and r["samples"] >= 20
    # no gradients to time: the fixed schedule, and no relabelled augmentations
    assert r["plan"]["schedule"] == "fixed" and r["plan"]["steps_per_round"] == 200


def test_synthesize_from_a_top1_api_resumes_without_paying_twice(model, tmp_path, monkeypatch):
    from dfkd.commands.synthesize import SynthesizeConfig, synthesize_set
    from dfkd.synthesis.transfer_set import TransferSet

    opts = {"batch_size": 10, "moves": 1, "directions": 2, "anchors": 2, "bisections": 3}
    with serving(create_app(model, "top1")) as url:
        def cfg(out, **kw):
            return SynthesizeConfig(teacher=TeacherArgs(path=url), method="db3kd",
                                    method_options=opts, num=30, out=str(tmp_path / out),
                                    device="cpu", **kw)

        full = synthesize_set(cfg("full"), progress=False)

        class Killed(BaseException):
            pass

        original = TransferSet.append

        def append_then_die(self, batch):  # the third round is paid for, then the run dies
            if len(self.parts) == 2:
                raise Killed
            original(self, batch)

        monkeypatch.setattr(TransferSet, "append", append_then_die)
        with pytest.raises(Killed):
            synthesize_set(cfg("killed"), progress=False)
        monkeypatch.undo()
        resumed = synthesize_set(cfg("killed"), resume=True, progress=False)
        short = synthesize_set(cfg("short", query_budget=full["queries"] // 2), progress=False)
    assert resumed["queries"] == full["queries"] and resumed["replayed_queries"] > 0
    a = TransferSet.open(tmp_path / "full").tensors()
    b = TransferSet.open(tmp_path / "killed").tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert short["queries"] <= full["queries"] // 2 and short["samples"] < 30


def test_ideal_loss_matches_its_formula_on_a_uniform_answer():
    from dfkd.synthesis.ideal import ideal_loss

    k = 10
    loss = ideal_loss(torch.zeros(4, k), torch.tensor([0, 3, 5, 9]), entropy_weight=5.0)
    # CE of a uniform answer is log K; mean(p log p) over samples and classes is -log(K) / K
    assert loss.item() == pytest.approx(np.log(k) - 5.0 * np.log(k) / k, rel=1e-6)
    confident = torch.nn.functional.one_hot(torch.tensor([0, 3]), k).float() * 20
    assert ideal_loss(confident, torch.tensor([0, 3]), 5.0) < ideal_loss(
        confident, torch.tensor([1, 4]), 5.0)


def test_ideal_makes_samples_against_the_student_and_asks_the_teacher_once_each(model):
    from dfkd.synthesis.ideal import IDEAL

    api = Counting(model, access="top1")
    teacher = BlackBoxTeacher(api)
    student = model  # a trained judge: G can learn to make what it puts in each class

    def round_of(steps: int, index: int = 0):
        synth = IDEAL(teacher, IDEAL.Options(batch_size=20, steps=steps, nz=16, ngf=8, lr_g=1e-2),
                      seed=0)
        return synth, synth.synthesize(student, index)

    api.sent.clear()
    synth, batch = round_of(40)
    assert api.sent == [20]  # the round's only queries: one per stored sample
    assert batch["x"].shape == (20, *model.spec.shape)
    assert batch["x"].min() >= 0 and batch["x"].max() <= 1
    assert torch.bincount(batch["classes"], minlength=10).tolist() == [2] * 10
    assert synth.report()["generator_steps"] == 40 and synth.teacher_passes == 20
    assert all(p.grad is None for p in student.parameters())
    first = round_of(1)[1]
    with torch.no_grad():
        hits = (student(batch["x"]).argmax(1) == batch["classes"]).float().mean()
        hits_first = (student(first["x"]).argmax(1) == first["classes"]).float().mean()
    assert hits >= 0.8 > hits_first  # G learned to make the student's classes
    # the teacher's answers are stored as given, and how often it disagrees is reported
    assert torch.equal(batch["target_logits"].argmax(1), model(batch["x"]).argmax(1))
    mismatch = (batch["target_logits"].argmax(1) != batch["classes"]).float().mean().item()
    assert synth.report()["label_mismatch"] == pytest.approx(mismatch)
    again = round_of(40)[1]
    assert torch.equal(again["x"], batch["x"])  # a round is reproducible from (seed, index)
    assert not torch.equal(round_of(40, index=1)[1]["x"], batch["x"])
    resumed = IDEAL(teacher, IDEAL.Options(batch_size=20, steps=40, nz=16, ngf=8, lr_g=1e-2),
                    seed=0)
    resumed.load_state_dict(synth.state_dict())  # the learnt tone carries over
    assert torch.equal(resumed.tone, synth.tone) and resumed.tone.abs().sum() > 0
    assert torch.equal(resumed.synthesize(student, 1)["x"], synth.synthesize(student, 1)["x"])
    with pytest.raises(DfkdError, match="needs one"):
        synth.synthesize(None, 2)
    with pytest.raises(DfkdError, match="entropy_weight must be >= 0 and batch_size at least 2"):
        IDEAL(teacher, IDEAL.Options(entropy_weight=-1.0), seed=0)
    with pytest.raises(DfkdError, match=r"got 5.0 and 1$"):
        IDEAL(teacher, IDEAL.Options(batch_size=1), seed=0)


def test_ideal_distills_from_a_top1_api_paying_one_query_per_sample(model, tmp_path):
    with serving(create_app(model, "top1")) as url:
        r = distill(_cfg(url, tmp_path / "i", method="ideal", budget="30steps",
                         steps_per_round=10,
                         method_options={"batch_size": 20, "steps": 5, "nz": 16, "ngf": 8}),
                    progress=False)
    assert r["teacher_access"] == "top1" and r["synthesis_rounds"] == 3
    assert r["queries"] == r["samples"] == 60 and r["generator_steps"] == 15


def test_a_round_answered_after_the_wall_clock_ran_out_is_kept_not_trained_on(model, tmp_path):
    """The budget ends inside ideal's first round: its answers are paid for, so the round is
    stored (for a resume) though the student never trains on it."""
    with serving(create_app(model, "top1")) as url:
        r = distill(_cfg(url, tmp_path / "i", method="ideal", budget="2s",
                         method_options={"batch_size": 20, "steps": 10**6, "nz": 16, "ngf": 8}),
                    progress=False)
    assert r["steps"] == 0 and r["synthesis_rounds"] == 1
    assert r["queries"] == r["samples"] == 20

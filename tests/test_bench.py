"""`dfkd bench`: anchors, gap, partial results that survive a crash, equal budgets."""

import json
import shutil
import subprocess

import pytest
import torch

import dfkd.commands.bench as bench
from dfkd.cli import main
from dfkd.commands.bench import (
    BenchConfig,
    entry_settings,
    resolve_methods,
    run_bench,
    with_gaps,
)
from dfkd.config import DistillConfig, TeacherArgs, load_config
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.machine import code_revision
from dfkd.models.classifier import load_classifier
from dfkd.report import REQUIRED_KEYS, distinct_colors
from dfkd.synthesis import create_synthesizer, list_methods

OUTPUTS = ("results.json", "results.md", "curves.png", "passes.png", "machine.json",
           "bench.yaml")


def _cfg(tmp_path, **kw):
    base = dict(suite="digits", methods="deepinv,noise", budget="20steps", seeds=1,
                out=str(tmp_path / "b"), teacher_epochs=1, teacher_cache=str(tmp_path / "cache"),
                device="cpu", eval_points=2,
                method_options={"deepinv.steps": 3, "deepinv.batch_size": 16,
                                "noise.batch_size": 32, "kd_real.batch_size": 64,
                                "scratch_real.batch_size": 64})
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = _cfg(tmp)
    return cfg, run_bench(cfg, progress=False)


def test_bench_writes_every_output_with_anchors_and_gap(finished):
    cfg, records = finished
    out = bench.Path(cfg.out)
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert [r["method"] for r in records] == ["kd_real", "scratch_real", "deepinv", "noise"]
    kd = records[0]["student_acc"]
    for r in records:
        assert set(REQUIRED_KEYS) <= set(r) and r["seed"] == 0 and r["dataset"] == "digits"
        assert r["gap"] == pytest.approx(kd - r["student_acc"], abs=1e-6)
        assert r["curve"] and r["curve"][-1]["student_acc"] == r["student_acc"]
        assert r["curve"][0]["seconds"] == 0 and r["curve"][0]["student_acc"] == \
            r["student_init_acc"]  # the student before its first step
        assert r["machine_gflops"] > 0  # the machine's speed beside each wall-clock number
        assert "dfkd_commit" in r  # the code beside each number (None for an installed copy)
    assert records[0]["gap"] == 0 and records[1]["teacher_passes"] == 0
    assert json.loads((out / "results.json").read_text()) == records
    md = (out / "results.md").read_text()
    assert "kd_real (real data)" in md and "| deepinv |" in md and "| noise |" in md
    assert "| matmul GFLOP/s |" in md and "fp32 matmul" in md and "| at start |" in md
    assert not (out / "default-curves.png").exists()  # nothing to leave out of curves.png
    machine = json.loads((out / "machine.json").read_text())
    assert {"cpu_count", "cpu_model", "gpu", "torch", "dfkd_commit"} <= set(machine)
    assert machine["matmul_gflops"] > 0


def test_same_teacher_for_every_method_of_a_seed(finished):
    _, records = finished
    assert len({r["teacher"] for r in records}) == 1
    assert len({r["teacher_acc"] for r in records}) == 1


def test_rerun_skips_finished_records(finished, monkeypatch):
    cfg, records = finished
    monkeypatch.setattr(bench, "distill", lambda *a, **k: pytest.fail("rerun distilled again"))
    assert run_bench(cfg, progress=False) == records


def test_crash_keeps_finished_records_and_rerun_completes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, methods="noise")
    calls = []

    def crash_on_third(dcfg, **kw):
        calls.append(dcfg.method)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return distill(dcfg, **kw)

    monkeypatch.setattr(bench, "distill", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, progress=False)
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["method"] for r in saved] == ["kd_real", "scratch_real"]
    monkeypatch.setattr(bench, "distill", distill)
    records = run_bench(cfg, progress=False)
    assert [r["method"] for r in records] == ["kd_real", "scratch_real", "noise"]
    assert records[:2] == saved
    # growing the seeds later only runs the new seed
    grown = run_bench(_cfg(tmp_path, methods="noise", seeds=2), progress=False)
    assert sorted((r["method"], r["seed"]) for r in grown) == sorted(
        (m, s) for m in ("kd_real", "scratch_real", "noise") for s in (0, 1))


def test_changed_settings_are_refused(finished):
    cfg, _ = finished
    with pytest.raises(DfkdError, match="different budget"):
        run_bench(bench.dataclasses.replace(cfg, budget="30steps"), progress=False)
    with pytest.raises(DfkdError, match="different student_init"):
        run_bench(bench.dataclasses.replace(cfg, student_init="teacher"), progress=False)


def test_student_init_reaches_every_student_but_scratch_real(tmp_path):
    records = run_bench(_cfg(tmp_path, methods="noise", budget="2steps",
                             student_init="teacher"), progress=False)
    assert {r["method"]: r["student_init"] for r in records} == {
        "kd_real": "teacher", "scratch_real": "random", "noise": "teacher"}
    assert "starts from the teacher's weights" in (tmp_path / "b" / "results.md").read_text()
    with pytest.raises(DfkdError,
                       match="unknown student_init 'pruned'; choose one of: auto, random, teacher"):
        run_bench(_cfg(tmp_path / "bad", student_init="pruned"), progress=False)
    assert not (tmp_path / "bad" / "b").exists()


def test_a_failing_method_is_recorded_and_the_rest_run(tmp_path):
    cfg = _cfg(tmp_path, methods="noise", method_options={"kd_real.dataset": "mnist",
                                                          "kd_real.data_root": str(tmp_path)})
    records = run_bench(cfg, progress=False)
    failed = [r for r in records if "error" in r]
    assert [r["method"] for r in failed] == ["kd_real"] and "mnist" in failed[0]["error"]
    assert all(r.get("gap") is None for r in records if "error" not in r)
    table = [line for line in (tmp_path / "b" / "results.md").read_text().splitlines()
             if line.startswith("|")]
    assert any("failed" in line for line in table)
    assert len({line.count("|") for line in table}) == 1  # a failed row has every column


def test_method_names_are_checked_and_anchors_run_unless_skipped():
    assert resolve_methods("noise")[:2] == ["kd_real", "scratch_real"]
    assert resolve_methods("noise", anchors=False) == ["noise"]
    assert set(resolve_methods("all")) == {*list_methods(anchors=True), bench.LRA_ENTRY}
    assert resolve_methods("default", "nayer")[-1] == "nayer"  # what auto chooses for the suite
    with pytest.raises(DfkdError, match="unknown method 'nope'"):
        resolve_methods("noise,nope")
    assert "kd_real" not in list_methods()


def test_method_variants_are_rows_of_their_own(tmp_path):
    assert bench.split_variant("mvn[sigma=0.5; cov=bn]") == ("mvn", {"sigma": "0.5", "cov": "bn"})
    assert resolve_methods("noise,noise[batch_size=8;lr=0.1],deepinv")[2:] == [
        "noise", "noise[batch_size=8;lr=0.1]", "deepinv"]
    with pytest.raises(DfkdError, match="bad option 'lr' in 'noise\\[lr\\]'"):
        bench.split_variant("noise[lr]")
    with pytest.raises(DfkdError, match="unknown method 'nope'"):
        resolve_methods("nope[a=1]")
    cfg = _cfg(tmp_path, methods="noise,noise[batch_size=8]")
    records = run_bench(cfg, progress=False)
    plain, variant = records[2], records[3]
    assert (plain["method"], variant["method"]) == ("noise", "noise[batch_size=8]")
    assert plain["method_options"]["batch_size"] == 32
    assert variant["method_options"]["batch_size"] == 8
    assert variant["run_dir"].endswith("runs/noise_batch_size=8/seed0")
    assert "| noise[batch_size=8] |" in (bench.Path(cfg.out) / "results.md").read_text()


def test_an_entry_sets_its_own_schedule_side_by_side(tmp_path):
    """NAME[schedule=...] runs that row under its own schedule in the same table, seed by seed;
    the key is a distill setting, never passed to the method as an option."""
    assert resolve_methods("default[schedule=proportional]", "nayer", anchors=False) == [
        "nayer[schedule=proportional]"]
    with pytest.raises(DfkdError, match="unknown schedule 'nope'; choose one of: planned"):
        resolve_methods("deepinv[schedule=nope]")
    with pytest.raises(DfkdError, match="share must be a number between 0 and 1, not '1'"):
        resolve_methods("deepinv[synthesis_share=1]")
    with pytest.raises(DfkdError, match="expected true or false, not 'maybe'"):
        resolve_methods("deepinv[compile=maybe]")
    assert entry_settings("nayer[compile=true;ngf=8]") == {"compile": True}
    cfg = _cfg(tmp_path, methods="deepinv,deepinv[schedule=fixed;relabel=stored],"
               "deepinv[synthesis_share=0.8]", no_anchors=True, compile=False)
    plain, variant, dearer = run_bench(cfg, progress=False)
    assert load_config(DistillConfig, bench.Path(plain["run_dir"]) / "config.yaml"
                       ).compile is False  # the bench's --no-compile reaches every row
    assert plain["plan"]["schedule"] == "planned" and variant["plan"]["schedule"] == "fixed"
    assert "schedule" not in variant["method_options"]
    assert variant["method_options"]["steps"] == plain["method_options"]["steps"] == 3
    saved = load_config(DistillConfig, bench.Path(variant["run_dir"]) / "config.yaml")
    assert (saved.schedule, saved.relabel) == ("fixed", "stored")
    # a larger share of the budget planned for synthesis
    assert "synthesis_share" not in dearer["method_options"]
    assert dearer["plan"]["synthesis_share"] > 0.7 > plain["plan"]["synthesis_share"]
    assert load_config(DistillConfig, bench.Path(dearer["run_dir"]) / "config.yaml"
                       ).synthesis_share == 0.8


def test_no_anchors_runs_the_requested_methods_alone(tmp_path):
    """A screen of one method: no real-data rows, so no gap, and the table says n/a."""
    cfg = _cfg(tmp_path, methods="noise", no_anchors=True)
    records = run_bench(cfg, progress=False)
    assert [r["method"] for r in records] == ["noise"] and records[0]["gap"] is None
    assert "| noise | " in (bench.Path(cfg.out) / "results.md").read_text()
    grown = run_bench(bench.dataclasses.replace(cfg, no_anchors=False), progress=False)
    assert [r["method"] for r in grown] == ["noise", "kd_real", "scratch_real"]  # same folder
    assert grown[0]["gap"] is not None


def test_a_folder_filled_by_two_invocations_names_both(tmp_path):
    """Each row keeps the command that made it, and bench.yaml names every method and seed the
    folder holds, not only the last invocation's (a records folder is filled over sessions)."""
    first, second = "dfkd bench --methods noise", "dfkd bench --methods noise[batch_size=8]"
    run_bench(_cfg(tmp_path, methods="noise", budget="2steps", no_anchors=True, seeds=2),
              progress=False, command=first)
    records = run_bench(_cfg(tmp_path, methods="noise[batch_size=8]", budget="2steps"),
                        progress=False, command=second)
    assert sorted((r["method"], r["seed"], r["command"]) for r in records) == sorted([
        ("noise", 0, first), ("noise", 1, first), ("kd_real", 0, second),
        ("scratch_real", 0, second), ("noise[batch_size=8]", 0, second)])
    saved = load_config(BenchConfig, tmp_path / "b" / "bench.yaml")
    assert bench.method_entries(saved.methods) == ["noise", "noise[batch_size=8]"]
    assert (saved.seeds, saved.no_anchors) == (2, False)
    md = (tmp_path / "b" / "results.md").read_text()
    assert f"- `{first}`" in md and f"- `{second}`" in md
    assert bench.method_entries(" mvn[a=1;b=2], nayer,,") == ["mvn[a=1;b=2]", "nayer"]


def test_code_revision_names_the_commit_of_a_tracked_package(tmp_path):
    """A row's dfkd_commit: the commit, '+' for uncommitted changes, None for an installed copy
    (also one inside someone else's repository)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert code_revision(tmp_path) is None  # no repository at all

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",
                               "-c", "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    git("init", "-q")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    assert code_revision(pkg) is None  # untracked, as a venv's copy would be
    git("add", "pkg")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    assert code_revision(pkg) == head
    (pkg / "__init__.py").write_text("x = 2\n")
    assert code_revision(pkg) == head + "+"


def test_gap_is_per_seed():
    records = [{"method": "kd_real", "seed": 0, "student_acc": 0.9},
               {"method": "kd_real", "seed": 1, "student_acc": 0.8},
               {"method": "x", "seed": 1, "student_acc": 0.7},
               {"method": "x", "seed": 2, "student_acc": 0.7}]
    gaps = [r["gap"] for r in with_gaps(records)]
    assert gaps[:3] == [0, 0, pytest.approx(0.1)] and gaps[3] is None


def test_suite_errors(tmp_path):
    with pytest.raises(DfkdError, match="needs --data-root"):
        run_bench(_cfg(tmp_path, suite="mnist"), progress=False)
    with pytest.raises(DfkdError, match="unknown suite 'imagenet'"):
        run_bench(_cfg(tmp_path, suite="imagenet"), progress=False)
    with pytest.raises(DfkdError, match="suite 'throughput' is timed by `dfkd bench"):
        run_bench(_cfg(tmp_path, suite="throughput"), progress=False)


def test_wall_clock_budget_stops_synthesis_mid_round(digits_teacher, tmp_path):
    """A method whose round outlasts the budget is cut off and evaluated where it stands."""
    cfg = DistillConfig(teacher=TeacherArgs(path=str(digits_teacher)), method="deepinv",
                        method_options={"batch_size": 16, "steps": 10**6},
                        student="digits_cnn_quarter", out=str(tmp_path / "r"), budget="1s",
                        device="cpu", eval_dataset="digits", eval_points=2)
    report = distill(cfg, progress=False)
    assert report["steps"] == 0 and report["synthesis_rounds"] == 0
    assert 0 < report["teacher_passes"] < 10**6 * 16
    assert report["student_acc"] is not None and "budget_overrun_seconds" in report


def test_real_data_anchors(digits_teacher):
    teacher = load_classifier(digits_teacher)
    kd = create_synthesizer("kd_real", teacher, {"batch_size": 64}, seed=3)
    a, b = kd.synthesize(None, 5), kd.synthesize(None, 5)
    assert torch.equal(a["x"], b["x"]) and a["target_logits"].shape == (64, 10)
    assert kd.teacher_passes == 128
    scratch = create_synthesizer("scratch_real", teacher, {"batch_size": 64}, seed=3)
    batch = scratch.synthesize(None, 0)
    assert "target_logits" not in batch and batch["labels"].shape == (64,)
    assert scratch.teacher_passes == 0
    # an epoch is a permutation of the data, cut into batches
    plain = create_synthesizer("scratch_real", teacher, {"batch_size": 64, "augment": False}, 3)
    first = plain.synthesize(None, 0)
    assert torch.equal(torch.sort(plain._order).values, torch.arange(len(plain.y)))
    assert torch.equal(first["x"], plain.x[plain._order[:64]])
    assert torch.equal(first["labels"], plain.y[plain._order[:64]])


def test_kd_real_mix_blends_its_batches_and_scratch_real_refuses_it(digits_teacher):
    teacher = load_classifier(digits_teacher)
    plain = create_synthesizer("kd_real", teacher, {"batch_size": 64}, seed=3).synthesize(None, 2)
    kd = create_synthesizer("kd_real", teacher, {"batch_size": 64, "mix": True}, seed=3)
    mixed = kd.synthesize(None, 2)
    assert torch.equal(mixed["x"], kd.synthesize(None, 2)["x"])  # a pure function of the index
    assert not torch.equal(mixed["x"], plain["x"]) and torch.equal(mixed["classes"],
                                                                    plain["classes"])
    # blends labelled by the teacher
    torch.testing.assert_close(mixed["target_logits"], teacher(mixed["x"]).float())
    with pytest.raises(DfkdError, match="scratch_real trains on the true labels"):
        create_synthesizer("scratch_real", teacher, {"mix": True}, 0)


def test_kd_real_max_images_keeps_the_first_images_only(digits_teacher):
    teacher = load_classifier(digits_teacher)
    full = create_synthesizer("kd_real", teacher, {"batch_size": 64}, seed=3)
    few = create_synthesizer("kd_real", teacher, {"batch_size": 64, "max_images": 100}, seed=3)
    assert len(few.y) == 100 and torch.equal(few.x, full.x[:100])
    assert set(few.synthesize(None, 7)["classes"].tolist()) <= set(full.y[:100].tolist())
    with pytest.raises(DfkdError, match="max_images must be >= 0"):
        create_synthesizer("kd_real", teacher, {"max_images": -1}, 0)


def test_anchor_without_dataset_is_a_clear_error(digits_teacher):
    teacher = load_classifier(digits_teacher)
    teacher.spec = bench.dataclasses.replace(teacher.spec, dataset=None)
    with pytest.raises(DfkdError, match="needs real training data"):
        create_synthesizer("kd_real", teacher, {}, 0)


def test_cli_bench(capsys, tmp_path):
    argv = ["bench", "--suite", "digits", "--methods", "noise", "--budget", "10steps",
            "--seeds", "1", "--out", str(tmp_path / "b"), "--teacher-epochs", "1",
            "--teacher-cache", str(tmp_path / "c"), "--eval-points", "1", "--device", "cpu",
            "--set", "noise.batch_size=16", "--no-progress"]
    assert main(argv) == 0
    assert "results.md" in capsys.readouterr().out
    records = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {r["method"] for r in records} == {"kd_real", "scratch_real", "noise"}
    assert main([*argv[:-3], "--set", "batch_size=16"]) == 2
    assert "METHOD.KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("key, message", [
    ("batch_size", "METHOD.KEY=VALUE"), ("deepinvv.steps", "'deepinvv' is neither a method nor"),
    ("abd.", "METHOD.KEY=VALUE")])
def test_a_set_key_that_no_row_reads_is_an_error_before_any_run(tmp_path, key, message):
    cfg = _cfg(tmp_path, method_options={key: "1"})
    with pytest.raises(DfkdError, match=message):
        run_bench(cfg, progress=False)
    assert not (tmp_path / "b").exists()


def test_a_poisoned_suite_reports_attack_success_and_defended_rows(tmp_path):
    """--poison trains the suite's teachers with the trigger (their own cache entry) and
    measures ASR in every run; METHOD+abd is the same method under the ABD defence."""
    cfg = _cfg(tmp_path, methods="noise,noise+abd", poison="badnets:target=0")
    cfg.method_options["abd.sr_share"] = "0.5"  # a defence option reaches the +abd rows only
    records = run_bench(cfg, progress=False)
    rows = {r["method"]: r for r in records}
    assert set(rows) == {"kd_real", "scratch_real", "noise", "noise+abd"}
    assert rows["noise+abd"]["defense_options"]["sr_share"] == 0.5
    assert all("error" not in r and 0 <= r["student_asr"] <= 1 for r in records)
    assert len({r["teacher_asr"] for r in records}) == 1  # one poisoned teacher per seed
    assert rows["noise+abd"]["defense"] == "abd" and "defense" not in rows["noise"]
    assert rows["noise+abd"]["student_init"] == "random"
    table = (tmp_path / "b" / "results.md").read_text()
    assert "| student ASR | teacher ASR |" in table and "badnets:target=0" in table
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    clean = run_bench(_cfg(tmp_path, methods="noise", out=str(tmp_path / "c")), progress=False)
    assert "student_asr" not in clean[0]
    assert len(list((tmp_path / "cache").iterdir())) == len(cached) + 1  # its own teacher


def test_black_box_rows_distill_through_a_served_api_and_count_queries(tmp_path):
    """--access puts the suite teacher behind `dfkd serve` (a child process on loopback) for
    every method that can use it; the rest run on its weights, marked white box."""
    cfg = _cfg(tmp_path, methods="deepinv,noise", access="top1", query_budget=320)
    records = run_bench(cfg, progress=False)
    rows = {r["method"]: r for r in records}
    assert all("error" not in r for r in records), records
    noise = rows["noise"]
    assert noise["teacher_access"] == "top1" and noise["queries"] == 320
    assert noise["ended_by"] == "query budget" and noise["steps"] == 10
    assert noise["curve"][-1]["queries"] == 320
    assert "queries" not in rows["deepinv"] and "queries" not in rows["kd_real"]
    table = (tmp_path / "b" / "results.md").read_text()
    assert "| deepinv (white box) |" in table and "| queries |" in table
    assert "top1 access, at most 320 queries each" in table
    assert (tmp_path / "b" / "queries.png").exists()
    assert "serving" in (tmp_path / "b" / "runs" / "noise" / "seed0" / "serve.log").read_text()


@pytest.mark.parametrize("n", [1, 3, 10, 11, 20])
def test_every_curve_of_a_zoo_gets_its_own_colour(n):
    colors = distinct_colors(n)
    assert len(colors) == n and len(set(colors)) == n


def _zoo_record(method, seed, acc, real=False):
    return {"method": method, "seed": seed, "student_acc": acc, "uses_real_data": real,
            "family": "online", "curve": [{"seconds": 0.0, "student_acc": 0.1},
                                          {"seconds": 60.0, "student_acc": acc}]}


def test_the_default_is_drawn_beside_the_three_strongest_others(tmp_path):
    """default-curves.png: the anchors, the default and the 3 best data-free rows by mean
    accuracy, whatever the default's own rank; none while the default has not run."""
    accs = {"a": 0.9, "b": 0.5, "c": 0.8, "d": 0.7, "e": 0.6, "deepinv": 0.4}
    records = [_zoo_record("kd_real", s, 0.95, real=True) for s in (0, 1)]
    records += [_zoo_record(m, s, acc + 0.01 * s) for m, acc in accs.items() for s in (0, 1)]
    shown = bench.default_and_strongest(records, "deepinv")
    assert {r["method"] for r in shown} == {"kd_real", "deepinv", "a", "c", "d"}
    assert len(shown) == 10  # every seed of each
    assert bench.default_and_strongest(records, "nayer") == []
    bench.save_comparison(shown, "seconds", tmp_path / "d.png", "s", "zoo")
    assert (tmp_path / "d.png").stat().st_size > 0

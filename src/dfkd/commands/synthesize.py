"""`dfkd synthesize`: write a reusable transfer set without training a student.

Rounds are reproducible from (seed, round index) alone, so a killed run resumes after its last
finished part and produces exactly the set an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dfkd.accel import Accel, pick_device
from dfkd.blackbox.teacher import QueryBudgetSpent, is_black_box
from dfkd.config import PRECISIONS, TEACHER_SOURCE, TeacherArgs, option, prepare_run_dir
from dfkd.engine.method_choice import AUTO, choose_transfer_set_method
from dfkd.errors import DfkdError
from dfkd.report import save_samples
from dfkd.synthesis import create_synthesizer
from dfkd.synthesis.transfer_set import TransferSet


@dataclass
class SynthesizeConfig:
    teacher: TeacherArgs = option(factory=TeacherArgs, help=f"teacher: {TEACHER_SOURCE}")
    method: str = option(AUTO, "a transfer-set method (see `dfkd methods`); auto: distill's "
                         "rule, db3kd for any API")
    method_options: dict = option(factory=dict, flag="--set", help="a method option, e.g. "
                                  "--set steps=500 (repeatable)")
    num: int = option(10000, "samples to write (rounded up to whole rounds)")
    out: str = option("runs/set", "the set's directory")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = option("fp32", "bf16: synthesis under autocast (GPU)", choices=PRECISIONS)
    channels_last: bool = option(False, "run the teacher in channels_last memory format (GPU)")
    compile: bool = option(False, "run the teacher through torch.compile")
    query_budget: int = option(0, "black-box teachers: images that may be sent to the API (0: "
                               "no limit); the set ends with its last round that fitted",
                               metavar="N")


def synthesize_set(cfg: SynthesizeConfig, *, resume: bool = False, progress: bool = True,
                   command: str = "") -> dict:
    out = Path(cfg.out)
    accel = Accel.of(cfg)  # a bad setting fails before the teacher is loaded
    device = pick_device(cfg.device)
    teacher = cfg.teacher.load().to(device).eval().requires_grad_(False)
    choice = None
    if cfg.method == AUTO:
        method, why = choose_transfer_set_method(teacher)
        cfg, choice = dataclasses.replace(cfg, method=method), why
    synth = create_synthesizer(cfg.method, teacher, cfg.method_options, cfg.seed)
    black_box = is_black_box(teacher)
    if not black_box:
        accel.prepare(teacher)  # after the method has found its layers by their module paths
    if synth.family != "transfer_set":
        raise DfkdError(f"method '{cfg.method}' is an online (generator) method and keeps no "
                        "transfer set; use `dfkd distill` with it")
    prepare_run_dir(out, cfg, resume, command)
    tset = TransferSet.open(out)
    meta = tset.read_meta()
    synth.teacher_passes, seconds = meta.get("teacher_passes", 0), meta.get("seconds", 0.0)
    if black_box:  # paid answers kept beside the set; a resumed round replays them for free
        teacher.budget = cfg.query_budget
        teacher.open_log(out / "queries")
        teacher.load_query_state(meta.get("queries_state", {"calls": 0, "paid": 0}))
    bar = tqdm(total=cfg.num, initial=len(tset), desc=f"synthesize {cfg.method}", unit="img",
               disable=not progress)
    while len(tset) < cfg.num:
        t0 = time.perf_counter()
        try:
            with accel.autocast(device):
                batch = synth.synthesize(None, len(tset.parts))
        except QueryBudgetSpent:
            break  # the set ends with its last finished round
        tset.append(batch)
        seconds += time.perf_counter() - t0
        meta = {"method": cfg.method, "teacher": str(cfg.teacher.path), "seed": cfg.seed,
                "spec": teacher.spec.to_json(), "samples": len(tset), "parts": len(tset.parts),
                "teacher_passes": synth.teacher_passes, "seconds": round(seconds, 3),
                "accel": accel.label, **({"method_choice": choice} if choice else {}),
                "method_options": dict(vars(synth.opts)),
                **({**teacher.report(), "queries_state": teacher.query_state()}
                   if black_box else {})}
        tset.write_meta(meta)
        bar.update(batch["x"].shape[0])
    bar.close()
    if tset.parts:
        save_samples(tset.parts[-1]["x"], out / "samples.png", f"{cfg.method}: transfer set",
                     tset.parts[-1]["classes"])
    return meta

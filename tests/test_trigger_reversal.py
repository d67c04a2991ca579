"""The `nc` defence: trigger reversal on a teacher with a planted backdoor, the anomaly that flags
its target, the stamping of student batches, and how a run takes it."""

import pytest
import torch
from torch import nn

from dfkd.commands.bench import parse_entry
from dfkd.config import DistillConfig, TeacherArgs
from dfkd.engine.distill import distill
from dfkd.errors import DfkdError
from dfkd.models.classifier import Classifier, InputSpec
from dfkd.student.defense import create_defense
from dfkd.student.trigger_reversal import ReversalOptions, Reversed, TriggerReversal, reverse

K = 6
SPEC = InputSpec((1, 8, 8), (0.5,), (0.5,), K)


class PlantedBackdoor(nn.Module):
    """Class k of an 8x8 image is its bright row k (rows 0..5), so reaching a class by hand takes
    a whole row; plus a backdoor: a bright 2x2 bottom-right corner sends any image to class 0."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):  # x normalized: -1 black .. 1 white
        logits = self.scale * x[:, 0, :K].mean(2)
        corner = x[:, 0, 6:, 6:].mean((1, 2))
        backdoor = 40 * torch.sigmoid(4 * (corner - 0.5))
        return logits + torch.stack([backdoor] + [0 * backdoor] * (K - 1), 1)


def _teacher():
    return Classifier(PlantedBackdoor(), SPEC, "planted").eval().requires_grad_(False)


def _images(n=32):
    """n images of random classes: their row bright, the rest dark, a little noise."""
    gen = torch.Generator().manual_seed(1)
    x = 0.1 + 0.05 * torch.rand(n, 1, 8, 8, generator=gen)
    x[torch.arange(n), 0, torch.randint(K, (n,), generator=gen)] = 0.9
    return x


def test_reversal_finds_the_planted_trigger_and_flags_its_class_only():
    teacher, x = _teacher(), _images()
    found = reverse(teacher, x, "patch", ReversalOptions(steps=150))
    assert found.masks.shape == (K, 1, 8, 8) and found.patterns.shape == (K, 1, 8, 8)
    assert int(found.sizes.argmin()) == 0
    anomaly = found.anomaly()
    assert anomaly[0] > 2 and (anomaly[1:] <= 2).all()
    mask = found.masks[0, 0]
    assert mask[6:, 6:].sum() > 0.5 * mask.sum()  # where the planted trigger is
    stamped = found.stamp(x, 0)
    assert teacher(stamped).argmax(1).eq(0).float().mean() >= 0.95
    blend = reverse(teacher, x, "blend", ReversalOptions(steps=150))
    assert blend.masks.shape == (K, 1, 1, 1)
    assert torch.all((blend.masks > 0) & (blend.masks < 1))
    assert (blend.anomaly() > 2).nonzero().flatten().tolist() == [0]


def test_a_class_never_reached_has_no_trigger():
    teacher = _teacher()
    teacher.net.forward = lambda x: PlantedBackdoor.forward(teacher.net, x) - \
        1e4 * torch.nn.functional.one_hot(torch.tensor(3), K)  # class 3 unreachable
    found = reverse(teacher, _images(), "patch", ReversalOptions(steps=20))
    assert found.sizes[3] == float("inf")
    defense = TriggerReversal(ReversalOptions(threshold=-1e9), teacher)
    defense.found = [found]
    assert 3 not in [cls for _, cls in defense.flagged()]
    assert defense.report()["trigger_sizes"]["patch"][3] is None  # valid JSON, not inf
    with pytest.raises(DfkdError, match="unknown trigger shape"):
        reverse(teacher, _images(), "ring", ReversalOptions())


def test_batches_are_stamped_after_the_search_with_the_teachers_answers_kept():
    defense = TriggerReversal(ReversalOptions(start=0.5, steps=100, samples=16, rows=0.25),
                              _teacher())
    x = _images(16)
    gen = torch.Generator().manual_seed(0)
    assert defense.inputs(x, 0.4, gen) is x and defense.found is None  # before its start
    out = defense.inputs(x, 0.5, gen)
    assert [(r.shape, cls) for r, cls in defense.flagged()] == [("patch", 0), ("blend", 0)]
    changed = (out != x).flatten(1).any(1)
    assert int(changed.sum()) == 4  # a quarter of the rows
    for row in changed.nonzero().flatten():  # each with one of the two triggers found
        assert any(torch.allclose(out[row], r.stamp(x[row:row + 1], 0)[0])
                   for r in defense.found)
    report = defense.report()
    assert report["stamped_rows"] == 4
    assert [(t["shape"], t["class"]) for t in report["triggers_found"]] == \
        [("patch", 0), ("blend", 0)]
    assert len(report["trigger_sizes"]["blend"]) == K
    # a resumed defence stamps the same rows with the same triggers, without searching again
    restored = TriggerReversal(defense.opts, _teacher())
    restored.load_state_dict(defense.state_dict())
    restored.search = None
    a = defense.inputs(x, 0.6, torch.Generator().manual_seed(5))
    b = restored.inputs(x, 0.6, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_no_target_found_leaves_the_batches_alone():
    defense = TriggerReversal(ReversalOptions(), _teacher())
    sizes = torch.tensor([0.3, 0.31, 0.29, 0.3, 0.32, 0.28])
    defense.found = [Reversed("patch", torch.ones(K, 1, 8, 8), torch.zeros(K, 1, 8, 8), sizes)]
    x = _images(8)
    assert defense.flagged() == [] and defense.inputs(x, 0.9, torch.Generator()) is x
    assert defense.report()["triggers_found"] == []


def test_bad_options_and_inputs_are_one_line_errors():
    with pytest.raises(DfkdError, match="rows and success in"):
        TriggerReversal(ReversalOptions(rows=0), _teacher())
    flat = Classifier(nn.Linear(5, 3), InputSpec((5,), (0.0,), (1.0,), 3), "lin")
    with pytest.raises(DfkdError, match="not \\(C, H, W\\)"):
        TriggerReversal(ReversalOptions(), flat)
    with pytest.raises(DfkdError, match="has no option 'sigma'"):
        create_defense("nc", {"sigma": "1"}, _teacher(), "kd", None, 0)
    assert parse_entry("deepinv+nc") == ("deepinv", {}, "plain", "nc")
    with pytest.raises(DfkdError, match="one backdoor defence"):
        parse_entry("deepinv+abd+nc")


def test_a_run_with_nc_starts_random_and_reports_what_it_found(digits_teacher, tmp_path):
    report = distill(DistillConfig(
        teacher=TeacherArgs(path=str(digits_teacher)), method="deepinv",
        method_options={"batch_size": 16, "steps": 2}, student="digits_cnn_quarter",
        budget="8steps", batch_size=16, steps_per_round=4, device="cpu", eval_points=2,
        out=str(tmp_path / "a"), defense="nc", loss="at",
        defense_options={"start": 0.5, "steps": 10, "samples": 8, "success": 0.1,
                         "threshold": -1e9}),
        progress=False)
    assert report["student_init"] == "random" and report["defense"] == "nc"
    assert report["triggers_found"] and report["stamped_rows"] == 4 * 3  # 4 steps, 3 rows each

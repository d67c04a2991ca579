import pytest
import torch
import torch.nn.functional as F

from dfkd.cli import build_parser
from dfkd.data.augment import (
    CHOICES,
    apply,
    default_shift,
    global_view,
    inversion_view,
    local_view,
    mix_pairs,
    pair_weights,
    random_affine,
    random_roll,
    shift_flip,
)
from dfkd.errors import DfkdError


def test_shift_moves_content_with_zero_fill_and_keeps_shape():
    x = torch.arange(1, 17, dtype=torch.float).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = shift_flip(x, torch.Generator().manual_seed(0), 1, flip=False)
    assert out.shape == x.shape
    for img in out:  # each output is the input moved by at most one pixel, zeros elsewhere
        nz = img[0][img[0] != 0]
        assert set(nz.tolist()) <= set(range(1, 17)) and len(nz) >= 9
        assert any(torch.equal(img, torch.roll(F_pad(x[0]), (dy, dx), (1, 2))[:, 1:5, 1:5])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 3  # offsets differ per sample


def F_pad(img):
    return torch.nn.functional.pad(img, (1, 1, 1, 1))


def test_flip_and_none():
    x = torch.rand(8, 3, 6, 6)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(apply("none", x, g)[0], x)
    flipped = shift_flip(x, g, 0, flip=True)
    pairs = zip(flipped, x, strict=True)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in pairs)
    assert default_shift(8) == 1 and default_shift(32) == 2


def test_affine_is_identity_without_range_and_varies_per_sample_with_it():
    x = torch.rand(16, 1, 12, 12)
    still = random_affine(x, torch.Generator().manual_seed(0), 0, degrees=0.0, scale=(1.0, 1.0))
    torch.testing.assert_close(still, x)
    a = apply("affine", x, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, apply("affine", x, torch.Generator().manual_seed(3))[0])
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert len({round(float((o - i).abs().sum()), 4) for o, i in zip(a, x, strict=True)}) == 16
    digit = torch.zeros(1, 1, 32, 32)
    digit[..., 8:24, 14:18] = 1.0  # a centred stroke keeps most of its ink under +-15 degrees
    moved = random_affine(digit.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1), 2)
    assert ((moved.sum((1, 2, 3)) / digit.sum()) - 1).abs().max() < 0.25


def test_inversion_views_roll_affine_crop_none():
    """The per-step views of pixel inversion: roll is DeepInversion's batch-wide roll, affine
    moves every sample on its own, keeps a black (fill-valued) canvas black and passes
    gradients back to the optimized inputs; none is the identity."""
    fill = torch.tensor(-0.42).view(1, 1, 1, 1)
    z = torch.randn(16, 1, 32, 32)
    assert torch.equal(inversion_view(z, "none", 2, torch.Generator().manual_seed(0), fill), z)
    rolled = inversion_view(z, "roll", 2, torch.Generator().manual_seed(0), fill)
    assert torch.equal(rolled, random_roll(z, 2, torch.Generator().manual_seed(0)))
    black = fill.expand(4, 1, 32, 32)
    torch.testing.assert_close(
        inversion_view(black, "affine", 2, torch.Generator().manual_seed(0), fill), black)
    stroke = fill.expand(16, 1, 32, 32).clone()
    stroke[..., 8:24, 14:18] = 2.0
    stroke.requires_grad_(True)
    moved = inversion_view(stroke, "affine", 2, torch.Generator().manual_seed(1), fill)
    assert len({round(float(m.sum()), 3) for m in moved.detach()}) == 16  # one move per sample
    moved.pow(2).sum().backward()
    assert stroke.grad.abs().sum() > 0
    cropped = inversion_view(z, "crop", 2, torch.Generator().manual_seed(2), fill, flip=True)
    torch.testing.assert_close(cropped, global_view(z, torch.Generator().manual_seed(2), 2, True,
                                                    fill))  # per sample, flip included
    with pytest.raises(DfkdError, match="unknown view 'warp'; choose one of: affine, roll, crop, "
                       "none"):
        inversion_view(z, "warp", 2, torch.Generator(), fill)


def test_views_shift_flip_and_crop_inside_the_image():
    x = torch.arange(2 * 16.0).view(2, 1, 4, 4)
    black = torch.full((1, 1, 1, 1), -1.0)
    same = global_view(x, torch.Generator().manual_seed(0), 0, False, black)
    torch.testing.assert_close(same, x)
    flipped = global_view(x, torch.Generator().manual_seed(0), 0, True, black)
    for i in range(2):  # each sample is either itself or its mirror image
        assert torch.allclose(flipped[i], x[i], atol=1e-5) or \
            torch.allclose(flipped[i], x[i].flip(2), atol=1e-5)
    shifted = global_view(x, torch.Generator().manual_seed(3), 1, False, black)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    crops = [padded[:, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
    for i in range(2):  # a whole-pixel crop of the image padded with black
        assert any(torch.allclose(shifted[i], c[i], atol=1e-4) for c in crops)
    x = torch.rand(8, 3, 8, 8, requires_grad=True)
    local = local_view(x, torch.Generator().manual_seed(0), 0.25, True)
    assert local.shape == x.shape and not torch.allclose(local, x)
    lo, hi = x.amin((1, 2, 3)), x.amax((1, 2, 3))  # bilinear inside the image: no fill
    assert (local.amin((1, 2, 3)) >= lo - 1e-6).all() and (local.amax((1, 2, 3)) <= hi + 1e-6).all()
    local.sum().backward()
    assert x.grad.abs().sum() > 0


def test_unknown_augmentation_is_a_clear_error():
    with pytest.raises(DfkdError, match="unknown augmentation 'rotate'; choose one of"):
        apply("rotate", torch.rand(2, 1, 8, 8), torch.Generator())


def test_affine_flip_mirrors_some_of_the_affine_outputs():
    x = torch.rand(32, 1, 12, 12)
    plain = apply("affine", x, torch.Generator().manual_seed(5))[0]
    both = apply("affine+flip", x, torch.Generator().manual_seed(5))[0]
    same = [torch.equal(b, p) for b, p in zip(both, plain, strict=True)]
    mirrored = [torch.equal(b, p.flip(2)) for b, p in zip(both, plain, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 0 < sum(mirrored) < 32


def test_mix_blends_each_sample_with_another_of_the_batch():
    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(16)])  # sample i is all i
    out = mix_pairs(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, mix_pairs(x, torch.Generator().manual_seed(0)))
    values = out[:, 0, 0, 0]
    assert (out == values.view(-1, 1, 1, 1)).all()  # one weight per sample, not per pixel
    assert 0 <= values.min() and values.max() <= 15 and not torch.equal(values, x[:, 0, 0, 0])
    g = torch.Generator().manual_seed(2)  # shift+mix: the shift, then the mix, one RNG
    expected = mix_pairs(shift_flip(x, g, default_shift(4), flip=False), g)
    assert torch.equal(apply("shift+mix", x, torch.Generator().manual_seed(2))[0], expected)


def test_stored_targets_follow_the_augmentation():
    """--relabel stored: the same augmented batch as without targets; a shift keeps each
    sample's target, a blend's target is the blend of its pair's probabilities."""
    x = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(16)])
    logits = torch.randn(16, 10)
    plain, none = apply("shift", x, torch.Generator().manual_seed(4))
    shifted, kept = apply("shift", x, torch.Generator().manual_seed(4), logits, 4.0)
    assert none is None and torch.equal(shifted, plain) and torch.equal(kept, logits)
    mixed, targets = apply("shift+mix", x, torch.Generator().manual_seed(4), logits, 4.0)
    assert torch.equal(mixed, apply("shift+mix", x, torch.Generator().manual_seed(4))[0])
    g = torch.Generator().manual_seed(4)  # the draws of shift+mix: the shift, then the pairs
    shift_flip(x, g, default_shift(4), flip=False)
    other, lam = pair_weights(16, g)
    assert torch.equal(mixed, lam.view(-1, 1, 1, 1) * shifted + (1 - lam.view(-1, 1, 1, 1)) *
                       shifted[other])
    probs = torch.softmax(logits / 4.0, 1)
    expected = lam.view(-1, 1) * probs + (1 - lam.view(-1, 1)) * probs[other]
    assert torch.allclose(torch.softmax(targets / 4.0, 1), expected, atol=1e-6)
    assert not torch.allclose(expected, probs, atol=1e-3)


def test_cli_offers_exactly_the_augmentations_of_the_engine(capsys):
    parser = build_parser()
    for name in CHOICES:
        assert parser.parse_args(["distill", "--teacher", "t", "--augment", name]).augment == name
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--teacher", "t", "--augment", "rotate"])
    assert "invalid choice: 'rotate'" in capsys.readouterr().err

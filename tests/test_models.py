"""The model registry, the summary's figures, forward passes and weight round-trips."""
from __future__ import annotations

import io

import pytest
import torch

from cnn.inference import class_probabilities, for_inference, mixed_probabilities, scored
from cnn.models import MODELS, ModelSpec, build_model, model_from_state, model_state, register_model, split_head
from cnn.summary import expected_shape, summarize
from cnn.transforms import BatchAugment, Normalize


def test_registry_knows_the_three_models() -> None:
    assert set(MODELS) == {"seed", "simple", "resnet18"}


def test_a_builder_takes_the_registrys_defaults_and_may_not_repeat_them() -> None:
    assert sum(p.numel() for p in build_model(ModelSpec("simple", 2, 32)).parameters()) == sum(
        p.numel() for p in build_model(ModelSpec("simple", 2, 32, {"width": 32, "depth": 4})).parameters()
    )
    with pytest.raises(TypeError, match="width keyword-only, without a default"):
        register_model("simple")(lambda *, num_classes, image_size, width=32, depth: None)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known models: resnet18, seed, simple"):
        build_model(ModelSpec("vgg", 2, 64))


@pytest.mark.parametrize(("num_classes", "total"), [(2, 438_842), (1, 219_801)])
def test_seed_summary_matches_the_tutorial(num_classes: int, total: int) -> None:
    summary = summarize(build_model(ModelSpec("seed", num_classes, 300)), 300)
    assert summary.total == total
    conv, _, pool, flatten, dense = summary.rows
    assert conv.output_shape == (10, 296, 296)  # (300 - 5 + 0) / 1 + 1
    assert (conv.weights, conv.biases) == (3 * 10 * 5 * 5, 10)
    assert pool.output_shape == (10, 148, 148)
    assert flatten.output_shape == (10 * 148 * 148,)
    assert (dense.weights, dense.biases) == (10 * 148 * 148 * num_classes, num_classes)
    table = summary.table()
    assert f"Total params: {total:,}" in table
    assert "(None, 10, 296, 296)" in table


def test_shape_formula_handles_stride_padding_and_ceil() -> None:
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    assert expected_shape(conv, (3, 33, 20)) == (8, 17, 10)
    pool = torch.nn.MaxPool2d(3, stride=2, ceil_mode=True)
    assert expected_shape(pool, (8, 10, 10)) == tuple(pool(torch.zeros(1, 8, 10, 10)).shape[1:])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("size", [32, 64])
def test_forward_pass_at_two_sizes(name: str, size: int) -> None:
    model = build_model(ModelSpec(name, 3, size)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_round_trip_without_unpickling_code(name: str) -> None:
    spec = ModelSpec(name, 4, 32)
    model = build_model(spec).eval()
    buf = io.BytesIO()
    torch.save(model_state(model, spec), buf)
    buf.seek(0)
    restored, restored_spec = model_from_state(torch.load(buf, weights_only=True))
    restored.eval()
    assert restored_spec == spec
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))


def test_model_options_travel_with_the_weights() -> None:
    spec = ModelSpec("simple", 2, 32, {"width": 8, "depth": 2})
    model = build_model(spec)
    restored, _ = model_from_state(model_state(model, spec))
    assert sum(p.numel() for p in restored.parameters()) == sum(p.numel() for p in model.parameters())


def test_resnet18_starts_from_a_local_weights_file(tmp_path) -> None:
    donor = build_model(ModelSpec("resnet18", 1000, 32))
    path = tmp_path / "resnet18.pth"
    torch.save(donor.state_dict(), path)
    spec = ModelSpec("resnet18", 5, 32, {"weights_path": str(path)})
    model = build_model(spec)
    torch.testing.assert_close(model.conv1.weight, donor.conv1.weight)
    assert model.fc.out_features == 5
    # Rebuilt from its own weights, it no longer needs the starting file.
    path.unlink()
    restored, _ = model_from_state(model_state(model, spec))
    torch.testing.assert_close(restored.conv1.weight, model.conv1.weight)


def test_initialisation_is_explicit_and_seeded() -> None:
    torch.manual_seed(0)
    a = build_model(ModelSpec("simple", 2, 32))
    torch.manual_seed(0)
    b = build_model(ModelSpec("simple", 2, 32))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    linear = a[-1]
    assert torch.count_nonzero(linear.bias) == 0


def test_normalize_maps_mean_to_zero_and_keeps_layout() -> None:
    pixels = torch.full((2, 4, 4, 3), 128, dtype=torch.uint8)
    norm = Normalize(mean=[128 / 255] * 3, std=[0.5] * 3, channels_last=True)
    out = norm(pixels)
    assert out.shape == (2, 3, 4, 4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        norm(pixels.float())


def test_augment_flips_and_shifts_only_in_training() -> None:
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    augment = BatchAugment(hflip=True, max_shift=0.25)
    assert torch.equal(augment.eval()(x), x)
    out = augment.train()(x)
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # A pure shift moves pixels, it does not invent values: every non-zero output value
    # exists in the input (zeros come from the padding).
    values = set(x.flatten().tolist())
    assert set(out[out != 0].flatten().tolist()) <= values


def test_augment_without_flip_or_shift_is_identity() -> None:
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(BatchAugment(hflip=False, max_shift=0.0).train()(x), x)


def _with_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """A few training-mode passes, so BatchNorm's running statistics are not the identity."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["simple", "resnet18"])
def test_inference_model_folds_batchnorm_and_computes_the_same(name: str) -> None:
    model = _with_batchnorm_statistics(build_model(ModelSpec(name, 3, 64)))
    fused = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "width"), [("seed", 10 * 30 * 30), ("simple", 256), ("resnet18", 512)])
def test_features_are_what_the_head_takes_from_the_same_fused_pass(name: str, width: int) -> None:
    model = _with_batchnorm_statistics(build_model(ModelSpec(name, 3, 64)))
    x = torch.randn(4, 3, 64, 64)
    split = split_head(model)
    with torch.no_grad():
        assert torch.equal(split(x), model(x))  # the model's own function, parameters shared
    assert split.feature_width == width
    fused = for_inference(model)
    normalize = Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    pixels = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for tta in ("none", "flip"):
        out = scored(fused, normalize, pixels, tta=tta, features=True)
        assert out.features.shape == (4, width) and out.features.dtype == torch.float32
        # probabilities as without features; features as the unfused body's, of the plain view
        torch.testing.assert_close(out.probabilities, class_probabilities(model, normalize, pixels, tta=tta))
        with torch.no_grad():
            torch.testing.assert_close(out.features, split.features(normalize(pixels)), rtol=1e-4, atol=1e-4)
    mixed = scored(fused, normalize, pixels, bf16=True, features=True)
    assert mixed.features.dtype == torch.float32  # bf16's rounding, float32's type
    torch.testing.assert_close(mixed.features, out.features, rtol=0.05, atol=0.1)


def test_mixed_precision_keeps_the_float32_labels() -> None:
    # Logits 10 and 10 + 0.01 * mean(x): a difference bf16 cannot see at 10 (its step
    # there is 1/16), so without the float32 recheck every label would be class 0.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1].fill_(0.01 / (3 * 8 * 8))
        model[1].bias.fill_(10.0)
    normalize = Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    pixels = torch.randint(0, 256, (64, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = class_probabilities(model, normalize, pixels)
    assert 0 < int(reference.argmax(1).sum()) < 64  # both labels occur
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert int(model(normalize(pixels)).float().argmax(1).sum()) == 0  # bf16 alone loses them
    mixed = mixed_probabilities(model, normalize, pixels)
    assert torch.equal(mixed.argmax(1), reference.argmax(1))


def test_mixed_precision_rounds_but_agrees_on_a_convnet() -> None:
    model = for_inference(_with_batchnorm_statistics(build_model(ModelSpec("simple", 3, 64))))
    normalize = Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    pixels = torch.randint(0, 256, (16, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    reference = class_probabilities(model, normalize, pixels)
    mixed = mixed_probabilities(model, normalize, pixels)
    assert torch.equal(mixed.argmax(1), reference.argmax(1))
    torch.testing.assert_close(mixed, reference, rtol=0, atol=0.01)  # bf16 rounding, not another answer


def test_flip_tta_averages_an_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("simple", 3, 16, {"width": 4, "depth": 2})).eval()
    normalize = Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    pixels = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    plain = class_probabilities(model, normalize, pixels)
    mirrored = class_probabilities(model, normalize, pixels.flip(2))  # (N, H, W, 3): W is dim 2
    flip = class_probabilities(model, normalize, pixels, tta="flip")
    assert torch.allclose(flip, (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(flip, plain, atol=1e-4)  # the mirror really counts
    assert torch.allclose(mixed_probabilities(model, normalize, pixels, tta="flip").argmax(1), flip.argmax(1))
    with pytest.raises(ValueError, match="known: none, flip"):
        class_probabilities(model, normalize, pixels, tta="rotate")

"""The second-order degradation model: kernels, JPEG, noise, the statistics of the drawn parameters, determinism,
configuration I/O, presets and argument errors."""

from __future__ import annotations

import dataclasses
import io
import math
from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from shared_data import shared_path

from faithdiff_pipeline.degradations import (
    KERNEL_TYPES,
    PRESETS,
    DegradationConfig,
    StageConfig,
    apply_degradation_plan,
    degrade,
    filter2d,
    gaussian_kernel,
    gaussian_noise,
    generalized_gaussian_kernel,
    get_preset,
    jpeg_compress,
    jpeg_quantization_tables,
    plateau_kernel,
    poisson_noise,
    pulse_kernel,
    sample_degradation_plan,
    sample_kernel_spec,
    sample_sinc_spec,
    sinc_kernel,
)

SIZES = (7, 9, 11, 13, 15, 17, 19, 21)


def _random_kernel(kind: str):
    """A drawn kernel of family ``kind`` zero-padded to 21, as the degradation model draws and builds it."""
    if kind == "sinc":
        return lambda size, g: sample_sinc_spec(size, g).build(pad_to=21)
    return lambda size, g: sample_kernel_spec(kind, size, (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), g).build(pad_to=21)


ISOTROPIC = {kind: _random_kernel(kind) for kind in ("iso", "generalized_iso", "plateau_iso", "sinc")}
ANISOTROPIC = {kind: _random_kernel(kind) for kind in ("aniso", "generalized_aniso", "plateau_aniso")}


def _smooth_images(batch: int = 2, size: int = 64, seed: int = 0, detail: int = 8) -> torch.Tensor:
    """Natural-ish test images independent of ../shared: coarse noise, one value per ``detail`` pixels, upsampled."""
    coarse = torch.rand(batch, 3, size // detail, size // detail, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _photo(name: str) -> torch.Tensor:
    with PIL.Image.open(shared_path("samples") / name) as image:
        array = np.array(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _within_binomial(count: int, n: int, p: float, name: str) -> None:
    tolerance = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(count / n - p) <= tolerance, f"{name}: {count}/{n} = {count / n:.4f}, expected {p} ± {tolerance:.4f}"


# -------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("kind", sorted({**ISOTROPIC, **ANISOTROPIC}))
@pytest.mark.parametrize("size", SIZES)
def test_kernels_sum_to_one_and_are_zero_padded_to_21(kind: str, size: int) -> None:
    assert set(ISOTROPIC) | set(ANISOTROPIC) == set(KERNEL_TYPES) | {"sinc"}  # every family is covered
    factory = {**ISOTROPIC, **ANISOTROPIC}[kind]
    kernel = factory(size, torch.Generator().manual_seed(size))
    assert kernel.shape == (21, 21) and kernel.dtype == torch.float32
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
    margin = (21 - size) // 2
    support = torch.zeros(21, 21, dtype=torch.bool)
    support[margin : 21 - margin, margin : 21 - margin] = True
    assert (kernel[~support] == 0).all()
    assert kernel[10, 10] == kernel.max()  # every family peaks at the centre


@pytest.mark.parametrize("kind", sorted(ISOTROPIC))
@pytest.mark.parametrize("seed", range(4))
def test_isotropic_kernels_are_invariant_under_rotation_and_transposition(kind: str, seed: int) -> None:
    kernel = ISOTROPIC[kind](SIZES[seed * 2 + 1], torch.Generator().manual_seed(seed))
    torch.testing.assert_close(kernel, kernel.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(kernel, torch.rot90(kernel), rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(ANISOTROPIC))
@pytest.mark.parametrize("seed", range(4))
def test_anisotropic_kernels_are_point_symmetric_but_not_isotropic(kind: str, seed: int) -> None:
    kernel = ANISOTROPIC[kind](21, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(kernel, torch.flip(kernel, dims=(0, 1)), rtol=0, atol=1e-7)
    assert (kernel - torch.rot90(kernel)).abs().max() > 1e-4  # a random elongated kernel is not rotation-invariant


def test_kernel_formulas() -> None:
    # Gaussian: ratio of neighbouring taps is exp(-1 / (2 sigma^2)) along an axis of the covariance.
    k = gaussian_kernel(21, 1.5)
    assert (k[10, 11] / k[10, 10]).item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)), rel=1e-5)
    # The generalised Gaussian with beta = 1 is the Gaussian.
    generalized = generalized_gaussian_kernel(15, 2.0, 0.7, 0.3, beta=1.0)
    torch.testing.assert_close(generalized, gaussian_kernel(15, 2.0, 0.7, 0.3))
    # Plateau: 1 / (1 + q^beta) with q = 1 / sigma^2 one pixel from the centre.
    p = plateau_kernel(21, 2.0, beta=1.5)
    assert (p[10, 11] / p[10, 10]).item() == pytest.approx(1 / (1 + (1 / 4) ** 1.5), rel=1e-5)
    # Anisotropic: sigma_x along the columns when theta = 0, sigma_y along the rows; theta = pi/2 swaps them.
    a = gaussian_kernel(21, 3.0, 0.8, 0.0)
    assert a[10, 13] > a[13, 10]
    torch.testing.assert_close(gaussian_kernel(21, 3.0, 0.8, math.pi / 2), a.T, rtol=0, atol=1e-7)
    # Sinc: k(r) / k(0) = 2 J1(w r) / (w r).
    w = 2.0
    s = sinc_kernel(21, w)
    j1 = torch.special.bessel_j1(torch.tensor(w * 3, dtype=torch.float64)).item()
    assert (s[10, 13] / s[10, 10]).item() == pytest.approx(2 * j1 / (w * 3), rel=1e-5)
    assert s.min() < 0  # ringing lobes
    torch.testing.assert_close(pulse_kernel(1, pad_to=5), F.pad(torch.ones(1, 1), (2, 2, 2, 2)))


def test_kernel_helpers_reject_bad_sizes_and_probabilities() -> None:
    with pytest.raises(ValueError, match="`size` must be a positive odd integer, got 8"):
        sample_kernel_spec("iso", 8, (0.2, 3.0))
    with pytest.raises(ValueError, match="`pad_to` must be at least the kernel size 21, got 19"):
        sample_sinc_spec(21).build(pad_to=19)
    # The mixed kernel's family probabilities are a stage's kernel_prob, refused unless they are a distribution.
    with pytest.raises(ValueError, match="`kernel_prob` must sum to 1"):
        StageConfig(kernel_list=("iso", "aniso"), kernel_prob=(0.5, 0.4)).validate()
    with pytest.raises(ValueError, match="`kernel_prob2` must be a probability in \\[0, 1\\], got -0.1"):
        DegradationConfig.from_dict({"kernel_list2": ["iso", "aniso"], "kernel_prob2": [-0.1, 1.1]})
    with pytest.raises(ValueError, match="`sigma_x` must be a finite number > 0"):
        gaussian_kernel(7, 0.0)


# ---------------------------------------------------------------------------------------- plan statistics
def test_per_image_draws_match_the_configured_probabilities() -> None:
    config = DegradationConfig()
    n = 3000
    plan = sample_degradation_plan(config, n, torch.Generator().manual_seed(0))
    for stage, blurs, settings in (
        ("1", [s.blur1 for s in plan.samples], config.stage1),
        ("2", [s.blur2 for s in plan.samples if s.blur2.kind != "pulse"], config.stage2),
    ):
        sinc_prob, sigma = settings.sinc_prob, settings.blur_sigma
        kinds = Counter(b.kind for b in blurs)
        _within_binomial(kinds["sinc"], len(blurs), sinc_prob, f"sinc{stage}")
        for kind, prob in zip(settings.kernel_list, settings.kernel_prob):
            _within_binomial(kinds[kind], len(blurs), (1 - sinc_prob) * prob, f"{kind}{stage}")
        sizes = Counter(b.size for b in blurs)
        assert set(sizes) == set(SIZES)
        for size in SIZES:
            _within_binomial(sizes[size], len(blurs), 1 / len(SIZES), f"size {size} stage {stage}")
        for b in blurs:
            if b.kind == "sinc":
                low = math.pi / 3 if b.size < 13 else math.pi / 5
                assert low <= b.omega_c <= math.pi
            else:
                assert sigma[0] <= min(b.sigma_x, b.sigma_y) <= max(b.sigma_x, b.sigma_y) <= sigma[1]
                isotropic = b.kind in ("iso", "generalized_iso", "plateau_iso")
                assert (b.sigma_x == b.sigma_y and b.theta == 0) == isotropic
    plateau_betas = [s.blur1.beta for s in plan.samples if s.blur1.kind.startswith("plateau")]
    assert all(1.0 <= beta <= 2.0 for beta in plateau_betas)
    _within_binomial(sum(beta == 1.0 for beta in plateau_betas), len(plateau_betas), 0.5, "plateau beta = 1")

    _within_binomial(sum(s.blur2.kind != "pulse" for s in plan.samples), n, config.second_blur_prob, "second blur")
    _within_binomial(sum(s.final_sinc.kind == "sinc" for s in plan.samples), n, config.final_sinc_prob, "final sinc")
    assert all(math.pi / 3 <= s.final_sinc.omega_c <= math.pi for s in plan.samples if s.final_sinc.kind == "sinc")
    _within_binomial(sum(s.final_resize_first for s in plan.samples), n, 0.5, "final order")
    for noises, jpegs, settings in (
        ([s.noise1 for s in plan.samples], [s.jpeg_quality1 for s in plan.samples], config.stage1),
        ([s.noise2 for s in plan.samples], [s.jpeg_quality2 for s in plan.samples], config.stage2),
    ):
        sigmas, scales, quality_range = settings.noise_range, settings.poisson_scale_range, settings.jpeg_range
        _within_binomial(sum(x.kind == "gaussian" for x in noises), n, 0.5, "gaussian noise")
        _within_binomial(sum(x.gray for x in noises), n, 0.4, "grey noise")
        assert all(sigmas[0] <= x.strength <= sigmas[1] for x in noises if x.kind == "gaussian")
        assert all(scales[0] <= x.strength <= scales[1] for x in noises if x.kind == "poisson")
        assert all(quality_range[0] <= q <= quality_range[1] for q in jpegs)
        # uniform in the range: the mean is the midpoint, within 4 standard errors
        mean, half = sum(jpegs) / n, (quality_range[1] - quality_range[0]) / 2
        assert abs(mean - (quality_range[0] + half)) < 4 * half / math.sqrt(3 * n)


@pytest.mark.parametrize("preset", ["faithdiff", "dasr-level1"])
def test_per_batch_resizes_match_the_configured_probabilities(preset: str) -> None:
    config = get_preset(preset)
    generator = torch.Generator().manual_seed(1)
    plans = [sample_degradation_plan(config, 1, generator) for _ in range(1500)]
    stages = [("", [p.resize1 for p in plans], config.stage1)]
    if config.two_stage:
        stages.append(("2", [p.resize2 for p in plans], config.stage2))
    else:
        assert all(p.resize2 is None and p.samples[0].blur2 is None for p in plans)
    for suffix, resizes, settings in stages:
        low, high = settings.resize_range
        counts = Counter(r.direction for r in resizes)
        for direction, prob in zip(("up", "down", "keep"), settings.resize_prob):
            _within_binomial(counts[direction], len(resizes), prob, f"{direction}{suffix}")
        for r in resizes:
            expected = {"up": (1.0, high), "down": (low, 1.0), "keep": (1.0, 1.0)}[r.direction]
            assert expected[0] <= r.factor <= expected[1]
        modes = Counter(r.mode for r in resizes)
        for mode in config.resize_modes:
            _within_binomial(modes[mode], len(resizes), 1 / len(config.resize_modes), f"mode {mode}{suffix}")


def test_dasr_presets_use_gaussian_kernels_only() -> None:
    for name in ("dasr-level1", "dasr-level2", "dasr-level3"):
        plan = sample_degradation_plan(get_preset(name), 400, torch.Generator().manual_seed(2))
        kinds = Counter(s.blur1.kind for s in plan.samples)
        assert set(kinds) == {"iso", "aniso"}
        _within_binomial(kinds["iso"], 400, 0.65, name)
        if name != "dasr-level3":
            assert all(s.final_sinc.kind == "pulse" and s.noise2 is None for s in plan.samples)


# ------------------------------------------------------------------------------------------------- degrade
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_give_lq_of_the_right_size_on_the_8_bit_grid(preset: str) -> None:
    config = get_preset(preset)
    hq = _smooth_images(batch=3, size=64, detail=16)
    lq = degrade(hq, config, torch.Generator().manual_seed(0))
    assert lq.shape == (3, 3, 64 // config.scale, 64 // config.scale) and lq.dtype == hq.dtype
    assert lq.min() >= 0 and lq.max() <= 1
    torch.testing.assert_close(lq, torch.round(lq * 255) / 255, rtol=0, atol=0)
    # a degraded version of its input: changed, yet strongly correlated with the area downscale
    reference = F.interpolate(hq, scale_factor=1 / config.scale, mode="area")
    assert (lq - reference).abs().mean() > 1 / 255
    assert torch.corrcoef(torch.stack([lq.flatten(), reference.flatten()]))[0, 1] > 0.8


def test_dasr_levels_are_ordered_by_severity() -> None:
    hq = _smooth_images(batch=4, size=64, detail=16)
    reference = F.interpolate(hq, scale_factor=0.25, mode="area")
    errors = []
    for level in (1, 2, 3):
        config = get_preset(f"dasr-level{level}")
        lq = torch.cat([degrade(hq, config, torch.Generator().manual_seed(seed)) for seed in range(3)])
        errors.append((lq - reference.repeat(3, 1, 1, 1)).abs().mean().item())
    assert errors[0] < errors[1] < errors[2]


def test_same_seed_same_lq_and_different_seed_different_lq() -> None:
    hq = _smooth_images(batch=2, size=64)
    config = DegradationConfig()
    first = degrade(hq, config, torch.Generator().manual_seed(7))
    again = degrade(hq, config, torch.Generator().manual_seed(7))
    other = degrade(hq, config, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    torch.manual_seed(3)
    global_first = degrade(hq, config)
    torch.manual_seed(3)
    assert torch.equal(global_first, degrade(hq, config))


def test_each_image_of_a_batch_gets_its_own_degradation() -> None:
    hq = _smooth_images(batch=1, size=64).repeat(4, 1, 1, 1)
    lq = degrade(hq, DegradationConfig(), torch.Generator().manual_seed(0))
    for i in range(1, 4):
        assert not torch.equal(lq[0], lq[i])


def test_plan_and_degrade_agree() -> None:
    hq = _smooth_images(batch=2, size=64)
    config = get_preset("realesrgan")
    generator = torch.Generator().manual_seed(11)
    plan = sample_degradation_plan(config, 2, generator)
    lq = apply_degradation_plan(hq, plan, generator)
    torch.testing.assert_close(lq, degrade(hq, config, torch.Generator().manual_seed(11)), rtol=0, atol=0)


def test_mild_settings_reduce_to_a_plain_downscale() -> None:
    """With every random step switched off or made negligible, the model is an area downscale (plus q100 JPEG)."""
    no_resize_noise_or_jpeg = {
        "resize_prob": (0.0, 0.0, 1.0),
        "gaussian_noise_prob": 1.0,
        "noise_range": (0.0, 0.0),
        "jpeg_range": (100.0, 100.0),
    }
    config = DegradationConfig(
        resize_modes=("area",),
        stage1=StageConfig(
            kernel_list=("iso",), kernel_prob=(1.0,), sinc_prob=0.0, blur_sigma=(0.2, 0.2), **no_resize_noise_or_jpeg
        ),
        stage2=dataclasses.replace(DegradationConfig().stage2, **no_resize_noise_or_jpeg),
        second_blur_prob=0.0,
        final_sinc_prob=0.0,
    )
    # Smooth enough that 4:2:0 chroma subsampling at the LQ size loses little.
    hq = _smooth_images(batch=2, size=96, detail=32)
    lq = degrade(hq, config, torch.Generator().manual_seed(0))
    reference = F.interpolate(hq, scale_factor=0.25, mode="area")
    # measured 1.6/255: two q100 JPEG passes with 4:2:0 chroma, and the 8-bit rounding
    assert (lq - reference).abs().mean() < 2.5 / 255


def test_filter2d_applies_each_kernel_to_its_own_image() -> None:
    images = _smooth_images(batch=2, size=32)
    kernels = torch.stack([gaussian_kernel(21, 2.0), pulse_kernel(1, pad_to=21)])
    out = filter2d(images, kernels)
    torch.testing.assert_close(out[1], images[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:1], filter2d(images[:1], kernels[:1]))
    assert (out[0] - images[0]).abs().mean() > 1e-3


# ---------------------------------------------------------------------------------------------------- JPEG
def test_jpeg_tables_and_output_match_pillow_on_a_real_photo() -> None:
    photo = _photo("astronaut.png")
    pil = PIL.Image.fromarray((photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    for quality in (30, 75, 95):
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality, subsampling=2)  # 4:2:0
        with PIL.Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            luma, chroma = jpeg_quantization_tables(quality)
            assert luma[0].flatten().int().tolist() == list(decoded.quantization[0])
            assert chroma[0].flatten().int().tolist() == list(decoded.quantization[1])
            reference = torch.from_numpy(np.array(decoded.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        ours = jpeg_compress(photo, quality)[0]
        difference = (ours - reference).abs().mean().item()
        # Measured 0.83, 0.85 and 0.83 /255 at qualities 30, 75, 95 (libjpeg's integer DCT and 8-bit intermediates
        # account for it), against JPEG's own change to the photo of 4.7, 3.2 and 1.95 /255.
        assert difference < 1.5 / 255, f"quality {quality}: {difference * 255:.3f}/255"
        assert difference < 0.5 * (photo[0] - reference).abs().mean().item()


def test_jpeg_uses_a_quality_per_image() -> None:
    images = _smooth_images(batch=2, size=40)
    both = jpeg_compress(images, torch.tensor([20.0, 90.0]))
    torch.testing.assert_close(both[:1], jpeg_compress(images[:1], 20.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(both[1:], jpeg_compress(images[1:], 90.0), rtol=0, atol=1e-6)
    same_image = images[:1].repeat(2, 1, 1, 1)
    error = (jpeg_compress(same_image, torch.tensor([20.0, 90.0])) - same_image).abs().mean((1, 2, 3))
    assert error[0] > 1.5 * error[1]
    assert both.shape == images.shape


# --------------------------------------------------------------------------------------------------- noise
def test_gaussian_noise_has_the_requested_sigma_and_grey_noise_is_shared() -> None:
    images = torch.full((2, 3, 64, 64), 0.5)
    noise = gaussian_noise(images, [10.0, 20.0], [False, True], torch.Generator().manual_seed(0))
    assert noise[0].std().item() * 255 == pytest.approx(10.0, rel=0.05)
    assert noise[1].std().item() * 255 == pytest.approx(20.0, rel=0.05)
    assert not torch.equal(noise[0, 0], noise[0, 1])
    assert torch.equal(noise[1, 0], noise[1, 2])


def test_poisson_noise_is_zero_mean_and_signal_dependent() -> None:
    dark_bright = torch.cat([torch.full((1, 3, 64, 32), 0.1), torch.full((1, 3, 64, 32), 0.9)], dim=-1)
    noise = poisson_noise(dark_bright, 1.0, False, torch.Generator().manual_seed(0))[0]
    assert abs(noise.mean().item()) < 0.01
    # Shot noise variance grows with the signal: the bright half is noisier.
    assert noise[..., 32:].std() > 2 * noise[..., :32].std()
    grey = poisson_noise(dark_bright, 1.0, True, torch.Generator().manual_seed(0))[0]
    assert torch.equal(grey[0], grey[1])


def _reference_grey_shot_noise(image: torch.Tensor, weights: tuple, seed: int) -> torch.Tensor:
    """Grey shot noise restated: luma with ``weights``, quantised to 8 bits, photon count = levels rounded up to a
    power of two, one Poisson draw from a generator seeded with ``seed``."""
    r, g, b = image.double()
    luma = (weights[0] * r + weights[1] * g + weights[2] * b).float()
    levels = torch.round(luma.clamp(0, 1) * 255) / 255
    count = 2.0 ** math.ceil(math.log2(len(torch.unique(levels))))
    return torch.poisson(levels * count, generator=torch.Generator().manual_seed(seed)) / count - levels


def test_grey_poisson_noise_uses_torchvision_luma_weights() -> None:
    # torchvision's rgb_to_grayscale, through which the release computes grey noise: 0.2989 R + 0.587 G + 0.114 B.
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(3))
    noise = poisson_noise(image[None], 1.0, True, torch.Generator().manual_seed(11))[0]
    expected = _reference_grey_shot_noise(image, (0.2989, 0.587, 0.114), seed=11)
    torch.testing.assert_close(noise[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(noise[0], noise[2])
    # BT.601's 0.299 quantises some pixels to another level, so the test tells the two weightings apart.
    bt601 = _reference_grey_shot_noise(image, (0.299, 0.587, 0.114), seed=11)
    assert (bt601 - expected).abs().max() > 1e-3


# -------------------------------------------------------------------------------------------- config & I/O
def test_yaml_round_trip_and_realesrgan_layout(tmp_path) -> None:
    import yaml  # a test extra

    preset = get_preset("dasr-level3")
    config = dataclasses.replace(preset, scale=2, stage2=dataclasses.replace(preset.stage2, jpeg_range=(40.0, 90.0)))
    path = tmp_path / "degradation.yml"
    config.to_yaml(path)
    assert DegradationConfig.from_yaml(path) == config

    # Real-ESRGAN/FaithDiff option files keep the kernel settings under `kernel_info` and may carry disabled extras.
    layout = {
        "scale": 4,
        "gray_prob": 0.0,
        "color_jitter_prob": 0.0,
        "noise_range": [1, 15],
        "kernel_info": {"sinc_prob": 0.1, "final_sinc_prob": 0.8, "blur_sigma2": [0.2, 1.5]},
    }
    (tmp_path / "train_kernel.yml").write_text(yaml.safe_dump(layout))
    assert DegradationConfig.from_yaml(tmp_path / "train_kernel.yml") == PRESETS["faithdiff"]

    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"noise_range": [1, 15], "nosie_range2": [1, 12]}))
    with pytest.raises(ValueError, match="Unknown degradation settings \\['nosie_range2'\\]"):
        DegradationConfig.from_yaml(tmp_path / "bad.yml")
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        DegradationConfig.from_yaml(tmp_path / "list.yml")


def test_from_dict_rejects_unsupported_extras() -> None:
    with pytest.raises(ValueError, match="`gray_prob` is not supported"):
        DegradationConfig.from_dict({"gray_prob": 0.1})
    assert DegradationConfig.from_dict({"scale": 2}).scale == 2


def test_presets() -> None:
    assert set(PRESETS) == {"faithdiff", "realesrgan", "dasr-level1", "dasr-level2", "dasr-level3"}
    assert PRESETS["faithdiff"] == DegradationConfig()
    copy = get_preset("realesrgan")
    copy.stage1.noise_range = (0.0, 1.0)
    assert PRESETS["realesrgan"].stage1.noise_range == (1.0, 30.0)
    assert not PRESETS["dasr-level1"].two_stage and PRESETS["dasr-level3"].two_stage
    with pytest.raises(ValueError, match="Unknown degradation preset 'x4'; valid presets are \\['dasr-level1'"):
        get_preset("x4")


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "hq, error, message",
    [
        (torch.rand(3, 64, 64), ValueError, "`hq` must be a \\[B, 3, H, W\\] tensor, got shape \\(3, 64, 64\\)"),
        (torch.rand(1, 1, 64, 64), ValueError, "`hq` must be a \\[B, 3, H, W\\] tensor"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "`hq` must be a floating-point tensor"),
        (torch.rand(1, 3, 62, 64), ValueError, "divisible by scale 4, got 62x64"),
        (np.zeros((1, 3, 64, 64)), TypeError, "`hq` must be a torch.Tensor, got ndarray"),
    ],
)
def test_degrade_rejects_bad_images(hq, error, message) -> None:
    with pytest.raises(error, match=message):
        degrade(hq, DegradationConfig())


def test_degrade_rejects_bad_config_generator_and_plan() -> None:
    hq = _smooth_images(batch=2, size=32)
    with pytest.raises(TypeError, match="`config` must be a DegradationConfig, got dict"):
        degrade(hq, {"scale": 4})
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator or None, got int"):
        degrade(hq, DegradationConfig(), 0)
    plan = sample_degradation_plan(DegradationConfig(), 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="`plan` was drawn for 3 images, but `hq` holds 2"):
        apply_degradation_plan(hq, plan)
    with pytest.raises(ValueError, match="`quality` must lie in \\[1, 100\\]"):
        jpeg_compress(hq, 0.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kernel_prob": (0.5, 0.25, 0.12, 0.03, 0.12, 0.03)}, "`kernel_prob` must sum to 1, got \\[0.5"),
        ({"resize_prob2": (0.3, 0.3, 0.3)}, "`resize_prob2` must sum to 1"),
        (
            {"kernel_list": ("iso", "box"), "kernel_prob": (0.5, 0.5)},
            "`kernel_list` must be a non-empty list of kernel",
        ),
        ({"kernel_prob": (0.5, 0.5)}, "`kernel_prob` must be a list of 6 probabilities"),
        ({"sinc_prob": 1.5}, "`sinc_prob` must be a probability in \\[0, 1\\], got 1.5"),
        ({"resize_range": (1.1, 1.5)}, "`resize_range` must contain 1"),
        ({"jpeg_range2": (60, 110)}, "`jpeg_range2` must lie <= 100"),
        ({"noise_range": (15, 1)}, "`noise_range` must have low <= high, got \\[15.0, 1.0\\]"),
        ({"blur_sigma": (0.0, 3.0)}, "`blur_sigma` must lie > 0"),
        ({"blur_kernel_size": 20}, "`blur_kernel_size` must be a positive odd integer, got 20"),
        ({"blur_kernel_size2_minimum": 23}, "`blur_kernel_size2_minimum` must be <= `blur_kernel_size2` \\(21\\)"),
        ({"scale": 0}, "`scale` must be a positive integer, got 0"),
        ({"resize_modes": ("lanczos",)}, "`resize_modes` must be a non-empty list from"),
    ],
)
def test_config_rejects_bad_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DegradationConfig.from_dict(overrides)

"""Reading and writing image files faithfully to the user's photo: orientation, bit depth, colour profile, alpha and
metadata.

Every image the project reads or writes goes through this module. On reading, a photo becomes an
:class:`ImageFile`: upright (EXIF orientation applied), in sRGB (an embedded ICC profile converted with LittleCMS,
the model works in sRGB), as 8-bit or 16-bit RGB samples (greyscale replicated), with its alpha channel apart and the
colour hidden under fully transparent pixels replaced by the colour of their surroundings. On writing, a restored
image gets back what the source had: its bit depth, greyscale, alpha (upscaled with LANCZOS), EXIF (orientation 1),
DPI scaled by the upscale factor, and an sRGB profile (or the source's, converted back), beside our parameters; and,
unless turned off, its XMP with what was done to it (:mod:`faithdiff_pipeline.provenance`), and C2PA Content
Credentials when signing credentials are given (:mod:`faithdiff_pipeline.content_credentials`).

Pillow handles everything but colour images of more than 8 bits per sample, which it reads as 8-bit: those are
read and written with imagecodecs and tifffile (the ``[16bit]`` extra).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
from PIL import ImageCms

from .atomic_files import atomic_path
from .checks import check_bool, check_choice, check_integer
from .release_settings import MAX_OUTPUT_PIXELS
from .provenance import (
    DEFAULT_DIGITAL_SOURCE_TYPE,
    JPEG_XMP_LIMIT,
    SOFTWARE,
    check_digital_source_type,
    file_sha256,
    result_xmp,
)

if TYPE_CHECKING:
    from .content_credentials import SigningCredentials

READABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Output format -> file suffix.
OUTPUT_FORMATS = {"png": ".png", "tiff": ".tif", "jpeg": ".jpg", "webp": ".webp"}
PROFILE_CHOICES = ("srgb", "source")
SIXTEEN_BIT_INSTALL = "pip install 'faithdiff-pipeline[16bit]'"
# Output format -> MIME type, for XMP's dc:format and C2PA.
MEDIA_TYPES = {"png": "image/png", "tiff": "image/tiff", "jpeg": "image/jpeg", "webp": "image/webp"}
# SOFTWARE (from .provenance) marks our results (EXIF/TIFF Software tag), so that a rerun tells them from a user's
# files of the same name.
# A result larger than this is refused before anything is allocated: 8192 x 8192 fits a 24 GB card with tiling.
DEFAULT_MAX_OUTPUT_PIXELS = MAX_OUTPUT_PIXELS

_ORIENTATION, _DESCRIPTION, _SOFTWARE, _XMP_TAG = 0x0112, 0x010E, 0x0131, 700
_PNG_XMP_KEY = "XML:com.adobe.xmp"
_METRES_PER_INCH = 0.0254
_UNREADABLE = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
# Rec. 709 luma weights: the primaries of sRGB.
_LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)


@dataclass
class ImageFile:
    """A photo as read from a file (or a PIL image), ready for restoration, with what its result must keep.

    Attributes:
        pixels: ``[H, W, 3]`` uint8 or uint16 samples, upright, in sRGB. Under fully transparent pixels, the colour
            of their surroundings.
        alpha: ``[H, W]`` alpha of the same dtype, or ``None``.
        greyscale: The source had one colour channel.
        icc_profile: The source's embedded profile when it was not sRGB (``None``: sRGB or untagged).
        exif: The source's EXIF block with orientation reset to 1, or ``None``.
        dpi: The source's resolution, or ``None``.
        xmp: The source's XMP packet, or ``None``: kept in the result, with what was done to it added.
        path: Where it was read from, if from a file.
        sha256: The SHA-256 (hex) of the file's bytes, if read from a file: names the original in the result's
            provenance where its XMP has no ids.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    greyscale: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None
    dpi: tuple[float, float] | None = None
    xmp: bytes | None = None
    path: Path | None = field(default=None, compare=False)
    sha256: str | None = field(default=None, compare=False)

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, as PIL gives sizes."""
        return self.pixels.shape[1], self.pixels.shape[0]

    def as_float(self) -> np.ndarray:
        """The colour samples as float32 ``[H, W, 3]`` in [0, 1]."""
        return self.pixels.astype(np.float32) / _max_value(self.pixels.dtype)

    def to_pil(self) -> PIL.Image.Image:
        """The colour as an 8-bit RGB PIL image (16-bit samples rounded to 8 bits): for captioners and previews."""
        if self.bit_depth == 8:
            return PIL.Image.fromarray(self.pixels)
        return PIL.Image.fromarray(_quantise(self.as_float(), 8))

    def pipeline_input(self) -> PIL.Image.Image | np.ndarray:
        """What the pipeline restores: an 8-bit image as a PIL image, so that it is upscaled exactly as the release
        upscales it (LANCZOS in 8 bits); a 16-bit image as float32 in [0, 1], so that no precision is lost."""
        return PIL.Image.fromarray(self.pixels) if self.bit_depth == 8 else self.as_float()


@dataclass(frozen=True)
class OutputOptions:
    """How a result is written.

    Attributes:
        format: ``"png"``, ``"tiff"``, ``"jpeg"`` or ``"webp"``.
        quality: JPEG/WebP quality, 1 to 100.
        bit_depth: 8 or 16; ``None`` takes the source's (16 only in PNG and TIFF).
        keep_colour: Write a greyscale source's result in colour instead of as its luminance.
        profile: ``"srgb"`` (the result in sRGB with an sRGB profile) or ``"source"`` (converted back to the
            source's profile, embedded).
        provenance: Write the result's XMP provenance (the source's XMP kept, the IPTC digital source type, this
            tool, the edit and the original); ``False`` leaves all of it out, the source's XMP too.
        digital_source_type: The IPTC Digital Source Type the result declares, a term of
            :data:`~faithdiff_pipeline.provenance.DIGITAL_SOURCE_TYPES` or its URI (kept as the term):
            ``"compositeWithTrainedAlgorithmicMedia"`` (edited with generative AI, the default) or
            ``"algorithmicallyEnhanced"``, for instance. See ``docs/provenance.md``.
    """

    format: str = "png"
    quality: int = 95
    bit_depth: int | None = None
    keep_colour: bool = False
    profile: str = "srgb"
    provenance: bool = True
    digital_source_type: str = DEFAULT_DIGITAL_SOURCE_TYPE

    def __post_init__(self) -> None:
        check_choice(self.format, "format", OUTPUT_FORMATS)
        check_integer(self.quality, "quality", 1, 100)
        if self.bit_depth not in (None, 8, 16):
            raise ValueError(f"`bit_depth` must be 8, 16 or None (the source's), got {self.bit_depth!r}.")
        if self.bit_depth == 16 and self.format not in ("png", "tiff"):
            raise ValueError(f"`bit_depth` 16 needs format 'png' or 'tiff'; {self.format!r} stores 8 bits.")
        check_choice(self.profile, "profile", PROFILE_CHOICES)
        check_bool(self.provenance, "provenance")
        # Frozen: the normalised term replaces a URI through object.__setattr__.
        object.__setattr__(self, "digital_source_type", check_digital_source_type(self.digital_source_type))

    @property
    def suffix(self) -> str:
        return OUTPUT_FORMATS[self.format]

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


# ----------------------------------------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike) -> ImageFile:
    """Reads an image file as an :class:`ImageFile`.

    Raises:
        ValueError: the file is not a readable image, or needs the ``[16bit]`` extra (the message says which).
    """
    path = Path(path)
    try:
        with PIL.Image.open(path) as opened:
            # Before load(): Pillow's decoder tile still says how many bits the file stores.
            samples = _high_bit_colour(opened, path)
            opened.load()
            image = _from_pil(opened, path, samples)
        image.sha256 = file_sha256(path)
        return image
    except _UNREADABLE as error:
        if isinstance(error, ValueError) and str(error).startswith(f"{os.fspath(path)!r}"):
            raise
        raise ValueError(f"{os.fspath(path)!r} could not be read as an image: {error}") from error


def from_pil(image: PIL.Image.Image) -> ImageFile:
    """A PIL image as an :class:`ImageFile`: the same conversions as :func:`read_image` (orientation, profile,
    16-bit greyscale, alpha)."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}.")
    return _from_pil(image, None, None)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file as it will be read (upright), from its header alone."""
    try:
        with PIL.Image.open(path) as opened:
            width, height = opened.size
            # A PNG's eXIf chunk, if any, comes before the pixels; without one, getexif() would decode them all.
            has_exif = opened.format != "PNG" or "exif" in opened.info
            turned = has_exif and opened.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except _UNREADABLE as error:
        raise ValueError(f"{os.fspath(path)!r} could not be read as an image: {error}") from error
    return (height, width) if turned else (width, height)


def needs_sixteen_bit_extra(path: str | os.PathLike) -> bool:
    """Whether reading ``path`` needs the ``[16bit]`` extra and it is not installed (so a command can say so before
    any work)."""
    try:
        with PIL.Image.open(path) as opened:
            high = _is_high_bit_colour(opened)
    except _UNREADABLE:
        return False
    return high and not _sixteen_bit_available()


def _sixteen_bit_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("imagecodecs", "tifffile"))


def _is_high_bit_colour(image: PIL.Image.Image) -> bool:
    """More than 8 bits per sample in several channels: Pillow would decode it to 8 bits."""
    if image.mode.startswith(("I", "F")):
        return False
    if image.format == "PNG":
        return bool(image.tile) and ";16" in str(image.tile[0].args)
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _high_bit_colour(image: PIL.Image.Image, path: Path) -> np.ndarray | None:
    """The full-precision samples (``[H, W, C]`` uint16) of a PNG/TIFF Pillow would reduce to 8 bits, else None."""
    if not _is_high_bit_colour(image):
        return None
    if not _sixteen_bit_available():
        raise ValueError(
            f"{os.fspath(path)!r} has 16-bit colour, which needs imagecodecs and tifffile: {SIXTEEN_BIT_INSTALL}"
        )
    if image.format == "PNG":
        import imagecodecs

        samples = imagecodecs.png_decode(path.read_bytes())
    else:
        import tifffile

        samples = tifffile.imread(path, key=0)
    samples = samples[..., None] if samples.ndim == 2 else samples
    return samples.astype(np.uint16)


def _from_pil(image: PIL.Image.Image, path: Path | None, high_bit: np.ndarray | None) -> ImageFile:
    exif = image.getexif()
    orientation = exif.get(_ORIENTATION, 1)
    colour_space = "CMYK" if image.mode == "CMYK" else None
    samples = high_bit if high_bit is not None else _samples_of(image)
    channels = samples.shape[-1]
    greyscale = channels in (1, 2)
    colour_channels = 4 if colour_space == "CMYK" else (1 if greyscale else 3)
    colour, alpha = samples[..., :colour_channels], samples[..., colour_channels:]
    alpha = alpha[..., 0] if alpha.shape[-1] else None
    profile = image.info.get("icc_profile") or None
    if profile is not None and _is_srgb(profile):
        profile = None
    if profile is not None:
        colour = _to_srgb(colour, profile, path)
    elif colour_space == "CMYK":
        colour = np.asarray(_pil_image(colour, "CMYK").convert("RGB"))
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    colour, alpha = _orient(colour, orientation), None if alpha is None else _orient(alpha, orientation)
    if alpha is not None:
        colour = _fill_transparent(colour, alpha)
    if orientation != 1:
        exif[_ORIENTATION] = 1
    # A TIFF's XMP tag is among its EXIF tags: it travels as ImageFile.xmp instead, never as a stale second copy.
    exif.pop(_XMP_TAG, None)
    dpi = image.info.get("dpi")
    xmp = image.info.get("xmp") or None
    return ImageFile(
        pixels=np.ascontiguousarray(colour),
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        greyscale=greyscale,
        icc_profile=profile,
        exif=exif.tobytes() if len(exif) else None,
        dpi=(float(dpi[0]), float(dpi[1])) if dpi else None,
        xmp=xmp.encode("utf-8") if isinstance(xmp, str) else xmp,
        path=path,
    )


def _samples_of(image: PIL.Image.Image) -> np.ndarray:
    """``[H, W, C]`` uint8 or uint16 samples of a PIL image: grey (C=1), grey+alpha (2), RGB (3), RGBA or CMYK (4)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image)
        return np.clip(array, 0, 65535).astype(np.uint16)[..., None]
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        check_unit_range(array, "a 32-bit float image")
        return _quantise(array, 16)[..., None]
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode in ("1", "La"):
        image = image.convert("L" if mode == "1" else "LA")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
        image = image.convert("RGB")
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` (``[H, W, ...]``) as EXIF ``orientation`` says the scene is shown."""
    if orientation in (5, 6, 7, 8):
        # 5-8 are 1-4 with the axes swapped first.
        array = np.swapaxes(array, 0, 1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        array = array[:, ::-1]
    if orientation in (3, 4):
        array = array[::-1]
    return array


def _fill_transparent(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour`` with every fully transparent pixel replaced by the colour of its surroundings (push-pull: average
    the known pixels down a pyramid, then fill the unknown ones from the next coarser level, upsampled)."""
    import torch
    import torch.nn.functional as F

    known = alpha > 0
    if known.all() or not known.any():
        return colour
    scale = _max_value(colour.dtype)
    weight = torch.from_numpy(known.astype(np.float32))[None, None]
    values = torch.from_numpy(colour.astype(np.float32) / scale).permute(2, 0, 1)[None] * weight
    pyramid = []
    while max(values.shape[-2:]) > 1:
        pyramid.append((values, weight))
        kernel = tuple(2 if side > 1 else 1 for side in values.shape[-2:])
        # Sums, not means: the ratio of the two is the mean of the known pixels alone.
        values = F.avg_pool2d(values, kernel, ceil_mode=True) * (kernel[0] * kernel[1])
        weight = F.avg_pool2d(weight, kernel, ceil_mode=True) * (kernel[0] * kernel[1])
    estimate = values / weight
    for values, weight in reversed(pyramid):
        coarse = F.interpolate(estimate, size=values.shape[-2:], mode="bilinear", align_corners=False)
        estimate = torch.where(weight > 0, values / weight.clamp_min(1e-12), coarse)
    filled = _quantise(estimate[0].permute(1, 2, 0).numpy(), 16 if colour.dtype == np.uint16 else 8)
    return np.where(known[..., None], colour, filled)


# ---------------------------------------------------------------------------------------------------- colour profiles


# A fixed creation date for the sRGB profile we embed (ICC header bytes 24-35: year, month, day, hour, minute,
# second), so that the same restoration gives the same file in every process.
_PROFILE_DATE = struct.pack(">6H", 2025, 1, 1, 0, 0, 0)


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """LittleCMS's built-in sRGB profile, embedded in results. LittleCMS stamps it with the time it is made; the
    stamp is replaced by a fixed date (the profile's ID is zero, so no checksum covers it)."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile[:24] + _PROFILE_DATE + profile[36:]


def _profile(data: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(data))


def _is_srgb(data: bytes) -> bool:
    try:
        description = ImageCms.getProfileDescription(_profile(data))
    except (ImageCms.PyCMSError, OSError, TypeError):
        return False
    return "srgb" in description.lower()


def _profile_space(data: bytes) -> str:
    """``"RGB"``, ``"GRAY"`` or ``"CMYK"``: the colour space a profile describes."""
    return _profile(data).profile.xcolor_space.strip()


def _transform(samples: np.ndarray, source: bytes, target: bytes, spaces: tuple[str, str], what: str) -> np.ndarray:
    """``samples`` (``[H, W, C]``, uint8 or uint16) converted from profile ``source`` to ``target``; ``spaces`` are
    the input's and the output's colour spaces."""
    if samples.dtype == np.uint16:
        return _transform_16bit(samples, source, target, spaces, what)
    modes = {"GRAY": "L", "RGB": "RGB", "CMYK": "CMYK"}
    image = _pil_image(samples, modes[spaces[0]])
    try:
        converted = ImageCms.profileToProfile(image, _profile(source), _profile(target), outputMode=modes[spaces[1]])
    except ImageCms.PyCMSError as error:
        raise ValueError(f"{what}: its colour profile could not be applied ({error}).") from error
    array = np.asarray(converted)
    return array[..., None] if array.ndim == 2 else array


def _transform_16bit(
    samples: np.ndarray, source: bytes, target: bytes, spaces: tuple[str, str], what: str
) -> np.ndarray:
    if not _sixteen_bit_available():
        raise ValueError(
            f"{what} has 16-bit samples and a colour profile, which need imagecodecs: {SIXTEEN_BIT_INSTALL}"
        )
    import imagecodecs

    array = samples[..., 0] if spaces[0] == "GRAY" else samples
    try:
        converted = imagecodecs.cms_transform(
            np.ascontiguousarray(array),
            source,
            target,
            colorspace=spaces[0].lower(),
            outcolorspace=spaces[1].lower(),
            outdtype=np.uint16,
        )
    except imagecodecs.CmsError as error:
        raise ValueError(f"{what}: its colour profile could not be applied ({error}).") from error
    return converted[..., None] if converted.ndim == 2 else converted


def _to_srgb(colour: np.ndarray, profile: bytes, where: Path | None) -> np.ndarray:
    """Source samples (grey, RGB or CMYK) in sRGB."""
    what = f"{os.fspath(where)!r}" if where is not None else "`image`"
    space = _profile_space(profile)
    if space == "RGB" and colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    expected = {1: "GRAY", 3: "RGB", 4: "CMYK"}[colour.shape[-1]]
    if space != expected:
        raise ValueError(f"{what} has {expected} samples but a colour profile for {space} images.")
    return _transform(colour, profile, srgb_profile(), (space, "RGB"), what)


def _from_srgb(samples: np.ndarray, profile: bytes, format: str, target: str | os.PathLike) -> np.ndarray:
    """Result samples (grey or RGB, sRGB) converted to the source's profile."""
    space = _profile_space(profile)
    if space == "CMYK" and format not in ("tiff", "jpeg"):
        raise ValueError(
            f"`target` {os.fspath(target)!r}: the source's CMYK profile needs format 'tiff' or 'jpeg', not {format!r}."
        )
    rgb = np.repeat(samples, 3, axis=-1) if samples.shape[-1] == 1 else samples
    converted = _transform(rgb, srgb_profile(), profile, ("RGB", space), f"`target` {os.fspath(target)!r}")
    if samples.shape[-1] == 1 and converted.shape[-1] == 3:
        # A greyscale photo tagged with an RGB profile stays greyscale.
        return _quantise((_float(converted) @ _LUMA)[..., None], 16 if samples.dtype == np.uint16 else 8)
    return converted


# ----------------------------------------------------------------------------------------------------------- writing


def save_result(
    image: np.ndarray | PIL.Image.Image,
    target: str | os.PathLike,
    source: ImageFile | None = None,
    options: OutputOptions | None = None,
    text: Mapping[str, str] | None = None,
    signing: SigningCredentials | None = None,
) -> Path:
    """Writes a restored image with what its source had (see the module's docstring), atomically.

    Args:
        image: The restored colour, float ``[H, W, 3]`` in [0, 1] (the pipeline's ``output_type="np"``), or an 8-bit
            RGB PIL image.
        target: The result's path; its suffix should match ``options.format``.
        source: The source as read; ``None`` writes an 8-bit sRGB image without alpha or source metadata.
        options: Format, quality, bit depth, greyscale and profile choices.
        text: Our parameters, stored in PNG text chunks, or as JSON in the EXIF/TIFF image description (with
            ``Software: faithdiff-pipeline``) in the other formats; summarised in the provenance.
        signing: Credentials to sign the result's C2PA Content Credentials with
            (:class:`~faithdiff_pipeline.content_credentials.SigningCredentials`), the source's file as its parent
            ingredient; ``None`` signs nothing. The result is signed before it takes its name, so that a run
            stopped in between never leaves an unsigned result that a rerun would take for finished.

    Raises:
        ValueError: the result cannot be written as asked (the message says why), or ``signing`` is given with
            ``options.provenance`` off or without a source file.
    """
    options = options or OutputOptions()
    if signing is not None and not options.provenance:
        raise ValueError("`signing` adds provenance, which `options.provenance=False` turns off: choose one.")
    if signing is not None and (source is None or source.path is None):
        raise ValueError(
            "`signing` needs `source` read from a file (read_image): the original is the manifest's parent."
        )
    source = source or ImageFile(pixels=np.zeros((1, 1, 3), np.uint8))
    colour = _float_rgb(image)
    depth = options.bit_depth or (source.bit_depth if options.format in ("png", "tiff") else 8)
    if source.greyscale and not options.keep_colour:
        colour = (colour @ _LUMA)[..., None].clip(0.0, 1.0)
    samples = _quantise(colour, depth)
    # ICC forbids an RGB profile on grey samples: a grey result is marked sRGB by PNG's sRGB chunk alone.
    profile = srgb_profile() if samples.shape[-1] == 3 else None
    if options.profile == "source" and source.icc_profile is not None:
        samples = _from_srgb(samples, source.icc_profile, options.format, target)
        fits = samples.shape[-1] != 1 or _profile_space(source.icc_profile) == "GRAY"
        profile = source.icc_profile if fits else None
    channels = [samples]
    if source.alpha is not None:
        if samples.shape[-1] == 4:
            raise ValueError(f"`target` {os.fspath(target)!r}: a CMYK result cannot carry the source's alpha.")
        if options.format == "jpeg":
            raise ValueError(
                f"`target` {os.fspath(target)!r}: JPEG cannot store the alpha channel; use png, tiff or webp."
            )
        channels.append(_quantise(_resize_alpha(source, samples.shape[1::-1]), depth)[..., None])
    pixels = np.concatenate(channels, axis=-1)
    scale = pixels.shape[1] / source.size[0]
    xmp = None
    if options.provenance:
        xmp = result_xmp(
            source.xmp,
            media_type=options.media_type,
            size=(pixels.shape[1], pixels.shape[0]),
            digital_source_type=options.digital_source_type,
            parameters=text,
            original_sha256=source.sha256,
            max_bytes=JPEG_XMP_LIMIT if options.format == "jpeg" else None,
        )
    metadata = _Metadata(
        icc_profile=profile,
        exif=source.exif,
        dpi=(source.dpi[0] * scale, source.dpi[1] * scale) if source.dpi else None,
        text=dict(text or {}),
        cmyk=samples.shape[-1] == 4,
        xmp=xmp,
    )
    target = Path(target)
    with atomic_path(target) as temporary:
        _encode(pixels, temporary, options, metadata)
        if signing is not None:
            from .content_credentials import sign_in_place

            sign_in_place(
                temporary,
                options.media_type,
                signing,
                source,
                title=target.name,
                digital_source_type=options.digital_source_type,
                parameters=text,
            )
    return target


def save_image(
    image: PIL.Image.Image, target: str | os.PathLike, text: Mapping[str, str] | None = None, **params: Any
) -> Path:
    """Writes a derived image (a comparison, a crop grid, a dataset crop, a map) atomically, in the format of the
    target's suffix; ``params`` go to PIL's ``save``. With ``text`` (a PNG target), the text is stored as
    :func:`save_result` stores it, marked as ours, so that :func:`result_text` (and a rerun) knows the file."""
    target = Path(target)
    if text is not None:
        info = PIL.PngImagePlugin.PngInfo()
        for key, value in {"Software": SOFTWARE, **text}.items():
            info.add_text(key, value)
        params["pnginfo"] = info
    with atomic_path(target) as temporary:
        image.save(temporary, format=PIL.Image.registered_extensions().get(target.suffix.lower(), "PNG"), **params)
    return target


def result_text(path: str | os.PathLike) -> dict[str, str] | None:
    """The text :func:`save_result` stored with ``text``, or ``None`` when ``path`` is not one of our results."""
    try:
        with PIL.Image.open(path) as opened:
            if opened.format == "PNG":
                # The XMP packet is an iTXt chunk too, but not part of the text save_result was given.
                text = {key: value for key, value in opened.text.items() if key != _PNG_XMP_KEY}
                # Results of 0.1.0 carry no Software chunk, only our version inside the parameters.
                ours = text.get("Software", "").startswith(SOFTWARE) or '"faithdiff_pipeline"' in text.get(
                    "parameters", ""
                )
                return text if ours else None
            exif = opened.getexif()
    except _UNREADABLE:
        return None
    if not str(exif.get(_SOFTWARE, "")).startswith(SOFTWARE):
        return None
    try:
        stored = json.loads(exif.get(_DESCRIPTION, ""))
    except json.JSONDecodeError:
        return None
    return stored if isinstance(stored, dict) else None


@dataclass
class _Metadata:
    icc_profile: bytes | None
    exif: bytes | None
    dpi: tuple[float, float] | None
    text: dict[str, str]
    cmyk: bool = False
    xmp: bytes | None = None

    def png_text(self) -> dict[str, str]:
        return {"Software": SOFTWARE, **self.text} if self.text else {}

    def exif_with_text(self) -> PIL.Image.Exif:
        """The EXIF block, with our text as JSON in the image description (ASCII: EXIF strings are)."""
        exif = PIL.Image.Exif()
        if self.exif:
            exif.load(self.exif)
        if self.text:
            exif[_SOFTWARE] = SOFTWARE
            exif[_DESCRIPTION] = json.dumps(self.text, ensure_ascii=True)
        return exif


def _float_rgb(image: np.ndarray | PIL.Image.Image) -> np.ndarray:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"`image` must be [H, W, 3], got shape {array.shape}.")
    check_unit_range(array, "`image`")
    return array


def _resize_alpha(source: ImageFile, size: tuple[int, int]) -> np.ndarray:
    """The source's alpha in [0, 1], LANCZOS-resized to ``size`` = (width, height) (16-bit alpha in float)."""
    if source.alpha.dtype == np.uint8:
        # As the colour is upscaled: LANCZOS in 8 bits.
        return np.asarray(PIL.Image.fromarray(source.alpha).resize(size, PIL.Image.LANCZOS), dtype=np.float32) / 255.0
    alpha = source.alpha.astype(np.float32) / 65535.0
    return np.asarray(PIL.Image.fromarray(alpha).resize(size, PIL.Image.LANCZOS)).clip(0.0, 1.0)


def _encode(pixels: np.ndarray, path: Path, options: OutputOptions, metadata: _Metadata) -> None:
    channels = pixels.shape[-1]
    if pixels.dtype == np.uint16 and channels > 1:
        _encode_16bit_colour(pixels, path, options, metadata)
        return
    if pixels.dtype == np.uint16:
        image = PIL.Image.fromarray(pixels[..., 0].astype("<u2"))
    else:
        modes = {1: "L", 2: "LA", 3: "RGB", 4: "CMYK" if metadata.cmyk else "RGBA"}
        image = _pil_image(pixels, modes[channels])
    params: dict[str, Any] = {"icc_profile": metadata.icc_profile} if metadata.icc_profile else {}
    if metadata.dpi and options.format != "webp":
        params["dpi"] = metadata.dpi
    if options.format == "png":
        info = PIL.PngImagePlugin.PngInfo()
        for key, value in metadata.png_text().items():
            info.add_text(key, value)
        if metadata.xmp:
            # Uncompressed, as the XMP specification requires of PNG's iTXt XMP chunk.
            info.add_itxt(_PNG_XMP_KEY, metadata.xmp.decode("utf-8"))
        if metadata.icc_profile is None:
            info.add(b"sRGB", b"\0")  # perceptual rendering intent
        params.update(pnginfo=info, exif=metadata.exif or b"")
    else:
        params["exif"] = metadata.exif_with_text()
        if metadata.xmp and options.format == "tiff":
            # A TIFF's EXIF parameter is its first IFD, where the XMP tag belongs.
            params["exif"][_XMP_TAG] = metadata.xmp
        elif metadata.xmp:
            params["xmp"] = metadata.xmp
    if options.format in ("jpeg", "webp"):
        params["quality"] = options.quality
    if options.format == "tiff":
        params["compression"] = "tiff_adobe_deflate"
    if not params.get("exif"):
        params.pop("exif", None)
    image.save(path, format=options.format.upper(), **params)


def _encode_16bit_colour(pixels: np.ndarray, path: Path, options: OutputOptions, metadata: _Metadata) -> None:
    """Grey+alpha, RGB and RGBA with 16 bits per sample, which Pillow cannot write."""
    if not _sixteen_bit_available():
        raise ValueError(f"writing 16-bit colour needs imagecodecs and tifffile: {SIXTEEN_BIT_INSTALL}")
    if options.format == "tiff":
        import tifffile

        tifffile.imwrite(
            path,
            pixels,
            photometric="minisblack" if pixels.shape[-1] == 2 else "rgb",
            extrasamples=[2] if pixels.shape[-1] in (2, 4) else None,  # unassociated alpha
            compression="zlib",
            iccprofile=metadata.icc_profile,
            resolution=metadata.dpi,
            resolutionunit="INCH" if metadata.dpi else None,
            description=json.dumps(metadata.text, ensure_ascii=True) if metadata.text else None,
            software=SOFTWARE if metadata.text else None,
            metadata=None,
            extratags=[(_XMP_TAG, 1, len(metadata.xmp), metadata.xmp, True)] if metadata.xmp else [],  # BYTE
        )
        return
    import imagecodecs

    if metadata.icc_profile is None:
        chunks = [(b"sRGB", b"\0")]
    else:
        chunks = [(b"iCCP", b"ICC profile\0\0" + zlib.compress(metadata.icc_profile))]
    if metadata.dpi:
        per_metre = [round(value / _METRES_PER_INCH) for value in metadata.dpi]
        chunks.append((b"pHYs", struct.pack(">IIB", *per_metre, 1)))
    if metadata.exif:
        chunks.append((b"eXIf", metadata.exif.removeprefix(b"Exif\0\0")))
    for key, value in metadata.png_text().items():
        chunks.append((b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    if metadata.xmp:
        chunks.append((b"iTXt", _PNG_XMP_KEY.encode("latin-1") + b"\0\0\0\0\0" + metadata.xmp))
    path.write_bytes(_insert_png_chunks(imagecodecs.png_encode(np.ascontiguousarray(pixels)), chunks))


def _insert_png_chunks(png: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """``png`` with ``chunks`` (type, data) inserted right after its header chunk, where iCCP must come."""
    header_end = 8 + 4 + 4 + 13 + 4  # signature, then IHDR: length, type, 13 bytes of data, CRC
    encoded = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in chunks
    )
    return png[:header_end] + encoded + png[header_end:]


# ------------------------------------------------------------------------------------------------------------ samples


def _pil_image(samples: np.ndarray, mode: str) -> PIL.Image.Image:
    """8-bit ``[H, W, C]`` samples as a PIL image of ``mode`` (``fromarray`` cannot tell CMYK from RGBA)."""
    height, width = samples.shape[:2]
    return PIL.Image.frombytes(mode, (width, height), np.ascontiguousarray(samples).tobytes())


def _max_value(dtype: np.dtype) -> float:
    return 65535.0 if dtype == np.uint16 else 255.0


def _float(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / _max_value(samples.dtype)


def _quantise(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float samples in [0, 1] rounded to ``bit_depth`` bits (as diffusers rounds to 8 bits)."""
    if bit_depth == 16:
        return (np.asarray(values, dtype=np.float64) * 65535.0).round().clip(0, 65535).astype(np.uint16)
    return (np.asarray(values, dtype=np.float32) * 255.0).round().clip(0, 255).astype(np.uint8)


def check_unit_range(array: np.ndarray, what: str) -> None:
    """Refuses float samples outside [0, 1] (and nan/inf), naming ``what`` and the range found."""
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise ValueError(
            f"{what} has float values from {np.nanmin(array):g} to {np.nanmax(array):g}; float images must be in "
            "[0, 1] (divide 8-bit values by 255)."
        )

"""One way to load, for every front-end (faithdiff-upscale, faithdiff-eval, the web demo): the device, the dtype and
weights variant, the captioner and the precision it fits in, the network that pre-cleans what the captioner sees,
and the restoration pipeline with its offload and compile set-up.

Each decision is a plain function of what it depends on (the device, its free memory, which packages are installed),
so that front-ends agree and tests can check every branch without a GPU.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from .captioning import Captioner
    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

RELEASE_CAPTIONER = "llava-hf/llava-1.5-13b-hf"
DTYPE_NAMES = ("float16", "bfloat16", "float32")
OFFLOAD_MODES = ("none", "text-encoders", "model", "sequential")
# "weights": the UNet stored in float8, computed in its dtype; "compute": float8 matrix products (torchao).
FP8_MODES = ("none", "weights", "compute")
COMPILE_MODES = ("none", "regional", "full")
# "half" is float16 (bfloat16 if the pipeline runs in it); the others are bitsandbytes quantisations.
CAPTIONER_PRECISIONS = ("half", "8bit", "4bit")
# GPU memory, in GiB, that a captioner needs in each precision: its weights plus one caption's activations.
CAPTIONER_MEMORY_GIB = {
    "llava-hf/llava-1.5-13b-hf": {"half": 28.0, "8bit": 16.0, "4bit": 9.0},
    "llava-hf/llava-1.5-7b-hf": {"half": 15.0, "8bit": 8.5, "4bit": 5.5},
}
_GIB = 1024**3
# Optional packages: the import name, and the extra of ours that installs it.
_EXTRAS = {"accelerate": "offload", "bitsandbytes": "caption", "spandrel": "preclean", "torchao": "fp8"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> None:
    """Refuses ``feature`` in one line naming the extra to install when ``module`` is missing."""
    if not installed(module):
        raise ValueError(
            f"{feature} needs {module}, which is not installed: pip install 'faithdiff-pipeline[{_EXTRAS[module]}]'"
        )


def check_options(
    offload: str = "none",
    captioner_precision: str = "auto",
    preclean: str | None = None,
    fp8: str = "none",
    low_vram: bool = False,
) -> None:
    """Every option whose dependency is missing, or that cannot go with another, refused before any model loads."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"`offload` must be one of {OFFLOAD_MODES}, got {offload!r}.")
    if fp8 not in FP8_MODES:
        raise ValueError(f"`fp8` must be one of {FP8_MODES}, got {fp8!r}.")
    if low_vram and (offload in ("model", "sequential") or fp8 == "compute"):
        raise ValueError(
            f"`low_vram` already sets float8 storage and text-encoder offload; drop offload {offload!r} / fp8 {fp8!r}."
        )
    if fp8 == "compute":
        require("torchao", "float8 compute")
    if offload in ("model", "sequential"):
        require("accelerate", f"offload {offload!r}")
    if captioner_precision in ("8bit", "4bit"):
        require("bitsandbytes", f"a {captioner_precision} captioner")
    if preclean is not None:
        require("spandrel", "pre-cleaning for the captioner")
        if not os.path.isfile(preclean):
            raise ValueError(f"`preclean` {preclean!r} does not exist; expected a .pth or .safetensors file.")


# ------------------------------------------------------------------------------------------------- device and dtype


def resolve_device(name: str | None = None) -> torch.device:
    """The device named (``cuda``, ``cuda:1``, ``mps``, ``cpu``), or with ``None``/``"auto"`` the first of CUDA, MPS
    and the CPU that this machine has."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"`device` {name!r} is not a torch device; expected auto, cpu, cuda, cuda:1, mps.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {name!r} asks for a CUDA GPU, but torch sees none; use cpu or auto.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`device` {name!r} asks for Apple's MPS, which this machine lacks; use cpu or auto.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype named, or with ``None``/``"auto"`` float16 on a GPU and float32 on the CPU."""
    import torch

    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPE_NAMES:
        raise ValueError(f"`dtype` must be auto or one of {DTYPE_NAMES}, got {name!r}.")
    return getattr(torch, name)


def weights_variant(dtype: torch.dtype) -> str | None:
    """The weights variant to load for ``dtype``: the ``fp16`` files for both half types (bfloat16 casts from them
    without loss that matters, and halves the download), the full-precision ones for float32."""
    import torch

    return "fp16" if dtype in (torch.float16, torch.bfloat16) else None


# -------------------------------------------------------------------------------------------------------- captioner


@dataclass(frozen=True)
class CaptionerPlan:
    """Which captioner to load and how.

    Attributes:
        model: Model id or folder; ``None``: no captions.
        precision: ``"half"``, ``"8bit"``, ``"4bit"`` or ``"full"`` (float32, off the GPU).
        note: One line for the user on the choice, or ``None`` when nothing needs saying.
    """

    model: str | None
    precision: str | None = None
    note: str | None = None

    @property
    def quantization(self) -> str | None:
        return self.precision if self.precision in ("8bit", "4bit") else None


def free_gpu_memory(device: torch.device) -> int:
    import torch

    return torch.cuda.mem_get_info(device)[0]


def plan_captioner(
    requested: str | None,
    device: torch.device,
    precision: str = "auto",
    free_memory: int | None = None,
    bitsandbytes: bool | None = None,
) -> CaptionerPlan:
    """Decides the captioner.

    Args:
        requested: A model id or folder, ``None``/``"auto"`` (the release's LLaVA-1.5-13B where a CUDA GPU can
            hold it) or ``"none"``.
        device: Where the captioner would run.
        precision: ``"auto"`` (on CUDA: half precision if it fits the free memory, else 8-bit, else 4-bit), or one
            of :data:`CAPTIONER_PRECISIONS`.
        free_memory: Free bytes on ``device`` (default: asked of CUDA).
        bitsandbytes: Whether bitsandbytes is installed (default: looked up).
    """
    if requested == "none":
        return CaptionerPlan(None)
    if precision != "auto" and precision not in CAPTIONER_PRECISIONS:
        raise ValueError(f"`precision` must be auto or one of {CAPTIONER_PRECISIONS}, got {precision!r}.")
    default = requested in (None, "auto")
    model = RELEASE_CAPTIONER if default else requested
    if device.type != "cuda":
        if default:
            return CaptionerPlan(
                None,
                note=f"no CUDA GPU: restoring without captions; --captioner {RELEASE_CAPTIONER} captions on this "
                "device too (slowly), or caption on a GPU machine first (--captions-only)",
            )
        if precision in ("8bit", "4bit"):
            raise ValueError(
                f"`captioner_quantization` {precision!r} needs a CUDA GPU (bitsandbytes), and the device is {device}: "
                "use 'half' or 'auto' here, or caption on a CUDA machine."
            )
        return CaptionerPlan(model, "full" if device.type == "cpu" else "half")
    if precision != "auto":
        return CaptionerPlan(model, precision)
    needs = CAPTIONER_MEMORY_GIB.get(model)
    if needs is None:  # an unknown model: its size cannot be told before loading it
        return CaptionerPlan(model, "half")
    free = free_gpu_memory(device) if free_memory is None else free_memory
    can_quantise = installed("bitsandbytes") if bitsandbytes is None else bitsandbytes
    for choice in CAPTIONER_PRECISIONS:
        if (choice == "half" or can_quantise) and needs[choice] * _GIB <= free:
            note = (
                None if choice == "half" else f"captioner {model} loads in {choice} to fit {free / _GIB:.1f} GiB free"
            )
            return CaptionerPlan(model, choice, note)
    smallest = "4bit" if can_quantise else "half"
    hint = "" if can_quantise else "; 8-bit and 4-bit need pip install 'faithdiff-pipeline[caption]'"
    return CaptionerPlan(
        None,
        note=f"captioner {model} needs about {needs[smallest]:g} GiB in {smallest}, the GPU has {free / _GIB:.1f} "
        f"GiB free: restoring without captions{hint} (--captioner none silences this)",
    )


def load_planned_captioner(plan: CaptionerPlan, device: torch.device, dtype: torch.dtype) -> Captioner | None:
    """The captioner of ``plan`` on ``device`` (``None`` when the plan has none)."""
    import torch

    from .captioning import load_captioner

    if plan.model is None:
        return None
    captioner_dtype = (
        torch.float32 if plan.precision == "full" else (dtype if dtype != torch.float32 else torch.float16)
    )
    return load_captioner(plan.model, plan.quantization, device=device, dtype=captioner_dtype)


def release(captioner: Captioner | None) -> None:
    """Frees the device memory of a captioner that is done, so that the restoration models never share the device
    with it."""
    import torch

    if captioner is None:
        return
    device = captioner.model.device
    captioner.model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_preclean(path: str | os.PathLike, device: torch.device) -> Callable[[PIL.Image.Image], PIL.Image.Image]:
    """A restoration network (BSRNet, Real-ESRGAN, SwinIR, ... as spandrel loads them) that cleans the LQ image the
    captioner reads, as the release's ``--use_bsrnet`` does; the restoration itself still starts from the original.
    """
    require("spandrel", "pre-cleaning for the captioner")
    import numpy as np
    import PIL.Image
    import torch
    from spandrel import ImageModelDescriptor, ModelLoader

    descriptor = ModelLoader(device=device).load_from_file(os.fspath(path))
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValueError(f"`preclean` {os.fspath(path)!r} is not an image-to-image restoration network.")
    descriptor.eval()

    @torch.no_grad()
    def clean(image: PIL.Image.Image) -> PIL.Image.Image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        output = descriptor(pixels.permute(2, 0, 1)[None].to(device))[0].clamp(0, 1)
        return PIL.Image.fromarray((output.permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8))

    return clean


# -------------------------------------------------------------------------------------------------------- pipeline


def check_model_source(model: str | os.PathLike | None) -> None:
    """Refuses, before any work, a ``model`` that cannot be a pipeline: a local folder without ``model_index.json``,
    a file, or a path that does not exist (a Hub id is checked when it loads)."""
    if model is None:
        return
    path = os.path.expanduser(os.fspath(model))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(
                f"`model` {path!r} is not a FaithDiff pipeline: it has no model_index.json. Convert the official "
                "release with `faithdiff-convert` first."
            )
        return
    if os.path.exists(path):
        raise ValueError(f"`model` {path!r} is a file; expected a converted pipeline folder.")
    from .hub import looks_like_local_path

    if looks_like_local_path(path):
        raise ValueError(f"`model` {path!r} does not exist; expected a converted pipeline folder or a Hub id.")


def load_pipeline(
    model: str | os.PathLike | None,
    device: torch.device,
    dtype: torch.dtype,
    offload: str = "none",
    compile: str = "none",
    vae_tiling: bool = False,
    fp8: str = "none",
    low_vram: bool = False,
    variant: str | None = "auto",
    **components: Any,
) -> FaithDiffSDXLPipeline:
    """The restoration pipeline, set up for ``device``.

    Args:
        model: A converted folder or Hub id; ``None``: the official release, converted on first use (the ``fp16``
            files for half precision).
        device: Where it runs.
        dtype: Its dtype.
        offload: ``"none"``, ``"text-encoders"`` (streamed in once per image), ``"model"`` or ``"sequential"``
            (diffusers' CPU offloads).
        compile: ``"none"``; ``"regional"`` (the UNet's repeated transformer blocks, compiled once and reused by
            every block: about the speed of ``"full"`` for a fraction of its compile time); ``"full"`` (the whole
            UNet, one CUDA graph per call on CUDA). The VAE's encoder and decoder and the LQ encoder are compiled
            too. Static shapes; the compiled code is cached on disk (:func:`use_compile_cache`), so a later process
            compiles from the cache.
        vae_tiling: Tile the VAE and the LQ encoder.
        fp8: ``"none"`` (the release's exact computation), ``"weights"`` (UNet weights stored in float8,
            :meth:`~FaithDiffSDXLPipeline.enable_fp8_weights`) or ``"compute"`` (float8 matrix products on GPUs of
            compute capability 8.9 and up, :meth:`~FaithDiffSDXLPipeline.enable_fp8_compute`; compile with it).
        variant: The weights variant to load; ``"auto"``: the ``fp16`` files for half precision where the source
            has them (always for the release), else the full-precision ones; a folder that has only ``fp16`` files
            loads those for float32 too, upcast, with a warning.
        low_vram: The 5 GB set-up (:meth:`~FaithDiffSDXLPipeline.enable_low_vram`): float8 storage, text encoders
            streamed in, VAE and LQ-encoder tiling.
        components: Component overrides for ``from_pretrained`` (e.g. a captioner).
    """
    from .conversion import converted_release
    from .pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

    check_options(offload, fp8=fp8, low_vram=low_vram)
    if compile not in COMPILE_MODES:
        raise ValueError(f"`compile` must be one of {COMPILE_MODES}, got {compile!r}.")
    if compile != "none" and offload in ("model", "sequential"):
        raise ValueError(f"`compile` keeps the UNet on the device; it cannot go with offload {offload!r}.")
    chosen = weights_variant(dtype) if variant == "auto" else variant
    source = converted_release(variant=chosen) if model is None else model
    if variant == "auto" and model is not None and not _has_variant(source, chosen):
        chosen = None
    kwargs = {"variant": chosen} if chosen else {}
    pipe = FaithDiffSDXLPipeline.from_pretrained(source, dtype=dtype, **kwargs, **components)
    if low_vram:
        pipe.enable_low_vram(device)
    elif offload == "text-encoders":
        pipe.enable_text_encoder_offload(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if fp8 == "weights" and not low_vram:
        pipe.enable_fp8_weights()
    elif fp8 == "compute":
        pipe.enable_fp8_compute()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if compile != "none":
        use_compile_cache()
        # Static shapes: a new image size gets its own specialised graph instead of a slower dynamic one.
        options = dict(fullgraph=True, dynamic=False)
        if compile == "regional":
            pipe.unet.compile_repeated_blocks(**options)
        else:
            pipe.unet.compile(**options, mode="reduce-overhead" if device.type == "cuda" else None)
        # The work around the UNet (VAE encode and decode, LQ features) otherwise stays eager: about a fifth of the
        # time at 2048 px once the UNet is compiled. VAE tiles have one size but at the edges, so few graphs result.
        for module in (pipe.vae.encoder, pipe.vae.decoder, pipe.lq_encoder):
            if module is not None:
                module.compile(dynamic=False)
    return pipe


def use_compile_cache(folder: str | os.PathLike | None = None) -> str:
    """Keeps torch's compilation caches (Inductor's graph and kernel caches) on disk, under our cache folder (or
    ``folder``), so that a later process's first image compiles from them instead of from scratch. Torch keys every
    entry by the graph, its input shapes and dtypes, the device and its own version, so another image size or dtype
    never reuses a wrong entry; a folder per torch version keeps upgrades apart. ``TORCHINDUCTOR_CACHE_DIR``, when
    the user has set it, wins. Returns the folder in use."""
    import torch
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from .conversion import release_cache_dir

    # Torch writes its default into the variable once it has used it: that is not the user's choice.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        base = os.fspath(folder) if folder is not None else os.fspath(release_cache_dir() / "torch-compile")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, f"torch-{torch.__version__}")
    torch._inductor.config.fx_graph_cache = True
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _has_variant(folder: str | os.PathLike, variant: str | None) -> bool:
    """Whether a local pipeline folder holds weights of ``variant``. A Hub id is loaded as given, as before: its
    files cannot be listed offline."""
    if variant is None or not os.path.isdir(folder):
        return False
    return any(f".{variant}." in name for _, _, names in os.walk(folder) for name in names)

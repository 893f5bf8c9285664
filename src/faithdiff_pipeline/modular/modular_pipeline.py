"""FaithDiffSDXLModularPipeline: FaithDiff's blocks as a diffusers modular pipeline, holding the components of
[`FaithDiffSDXLPipeline`] under the same names (what the blocks read off them is in :mod:`.pipeline_facts`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusers.modular_pipelines import ComponentsManager, ModularPipelineBlocks
from diffusers.modular_pipelines.stable_diffusion_xl.modular_pipeline import StableDiffusionXLModularPipeline

if TYPE_CHECKING:
    from ..pipeline_faithdiff_sdxl import FaithDiffSDXLPipeline

class FaithDiffSDXLModularPipeline(StableDiffusionXLModularPipeline):
    r"""
    FaithDiff image restoration and super-resolution as a diffusers modular pipeline, running
    [`~faithdiff_pipeline.modular.FaithDiffSDXLAutoBlocks`] by default.

    Its components are [`FaithDiffSDXLPipeline`]'s, under the same names (``vae``, ``text_encoder``,
    ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``unet``, ``alignment``, ``scheduler``, ``lq_encoder``,
    ``captioner``, ``captioner_processor``), so one [`~diffusers.ComponentsManager`] holds both pipelines' and an SDXL
    modular pipeline can take the text encoders and the VAE from it. Being SDXL's modular pipeline class, it loads
    LoRAs and textual inversions as SDXL's does.

    A call takes [`FaithDiffSDXLPipeline`]'s arguments by name and gives the same images, named ``images``:
    ``pipe(image=photo, prompt="...", upscale=2, output="images")``.
    """

    default_blocks_name = "FaithDiffSDXLAutoBlocks"

    def __init__(
        self,
        blocks: ModularPipelineBlocks | None = None,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        components_manager: ComponentsManager | None = None,
        collection: str | None = None,
        workflow: str | None = None,
        modular_config_dict: dict[str, Any] | None = None,
        config_dict: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if blocks is None:
            # diffusers looks default blocks up in its own namespace, where ours are not.
            from .modular_blocks_faithdiff_sdxl import FaithDiffSDXLAutoBlocks

            blocks = FaithDiffSDXLAutoBlocks()
        super().__init__(
            blocks,
            pretrained_model_name_or_path,
            components_manager=components_manager,
            collection=collection,
            workflow=workflow,
            modular_config_dict=modular_config_dict,
            config_dict=config_dict,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        components_manager: ComponentsManager | None = None,
        collection: str | None = None,
        workflow: str | None = None,
        **kwargs: Any,
    ) -> FaithDiffSDXLModularPipeline:
        r"""
        Reads a converted FaithDiff folder or Hub repository as a modular pipeline, with the installed package's
        blocks: no code from the folder runs, so no ``trust_remote_code`` is needed (plain diffusers loads the same
        folder with ``ModularPipeline.from_pretrained(folder, trust_remote_code=True)``). Folders saved before the
        modular files were written load too.

        As with every modular pipeline, the components are loaded afterwards, with
        [`~ModularPipeline.load_components`] (e.g. ``pipe.load_components(dtype=torch.float16)``).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): A local folder or a Hub repository id; a
                repository is downloaded as a snapshot first, with the weights of ``variant`` alone
                (``cache_dir``, ``revision``, ``token`` and ``local_files_only`` apply).
            components_manager ([`~diffusers.ComponentsManager`], *optional*): Holds the components once loaded.
            collection (`str`, *optional*): Their collection in ``components_manager``.
            workflow (`str`, *optional*): One of the blocks' workflows, to expect only its components.
            variant (`str`, *optional*): The weights variant to load (``"fp16"``), where the folder holds several.
        """
        from ..hub import folder_weight_variants, modular_index_of_folder, resolve_pipeline_folder

        folder = resolve_pipeline_folder(pretrained_model_name_or_path, kwargs)
        index = modular_index_of_folder(folder)
        variant = kwargs.pop("variant", None)
        if variant is not None:
            for name in folder_weight_variants(folder):
                if isinstance(index.get(name), list):
                    index[name][2]["variant"] = variant
        return cls(
            pretrained_model_name_or_path=folder,
            components_manager=components_manager,
            collection=collection,
            workflow=workflow,
            modular_config_dict=index,
            **kwargs,
        )

    @classmethod
    def from_pipe(
        cls,
        pipeline: FaithDiffSDXLPipeline,
        blocks: ModularPipelineBlocks | None = None,
        components_manager: ComponentsManager | None = None,
        collection: str | None = None,
    ) -> FaithDiffSDXLModularPipeline:
        r"""
        A modular pipeline holding ``pipeline``'s very component objects (nothing is copied or loaded), and its
        ``force_zeros_for_empty_prompt``.

        Args:
            pipeline ([`FaithDiffSDXLPipeline`]): The pipeline whose components to take.
            blocks ([`~diffusers.modular_pipelines.ModularPipelineBlocks`], *optional*): The blocks to run;
                [`FaithDiffSDXLAutoBlocks`] by default.
            components_manager ([`~diffusers.ComponentsManager`], *optional*): Receives the components.
            collection (`str`, *optional*): Their collection in ``components_manager``.
        """
        modular = cls(blocks=blocks, components_manager=components_manager, collection=collection)
        expected = modular._component_specs
        held = {name: component for name, component in pipeline.components.items() if component is not None}
        modular.update_components(**{name: component for name, component in held.items() if name in expected})
        configs = {name: pipeline.config[name] for name in modular._config_specs if name in pipeline.config}
        modular.update_components(**configs)
        return modular

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        r"""
        Saves the components and ``modular_model_index.json`` as [`~ModularPipeline.save_pretrained`] does, with the
        blocks' definition beside them (``modular_config.json`` and the few lines of code that import the blocks
        from the installed package), so that plain ``ModularPipeline.from_pretrained(folder,
        trust_remote_code=True)`` runs these blocks again. The index names ``StableDiffusionXLModularPipeline``,
        the class diffusers can import by name, which this class extends.

        ``push_to_hub=True`` (with ``repo_id``, ``token``, ``private``, ``create_pr``, ``commit_message``) uploads the
        folder once it is complete, its index pointing at the repository.
        """
        from ..hub import upload_pipeline_folder

        defaults = {"repo_id": None, "token": None, "private": None, "create_pr": False, "commit_message": None}
        push = {key: kwargs.pop(key, default) for key, default in defaults.items()}
        kwargs.setdefault("overwrite_modular_index", True)
        # diffusers splits the folder's name off a string.
        save_directory = os.fspath(save_directory)
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        # diffusers saves the components and their index, not the blocks that run them.
        self._blocks.save_pretrained(save_directory)
        _name_diffusers_class(Path(save_directory) / self.config_name)
        if push_to_hub:
            push["commit_message"] = push["commit_message"] or f"Upload {type(self).__name__}"
            upload_pipeline_folder(save_directory, **push)


def _name_diffusers_class(index_path: Path) -> None:
    """Rewrites the ``_class_name`` of a saved ``modular_model_index.json`` to the class diffusers can import."""
    from ..atomic_files import write_text_atomic
    from ..hub import MODULAR_PIPELINE

    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["_class_name"] = MODULAR_PIPELINE
    write_text_atomic(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")

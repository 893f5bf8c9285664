"""What a result says about how it was made: the XMP provenance written into every result.

A restored photo is not the photo that was scanned: FaithDiff draws detail the input did not have from a generative
diffusion model. Each result therefore says so in its XMP packet, beside everything the original's packet had
(rights, creators, descriptions, keywords), in the properties image tools and archives already read:

- ``Iptc4xmpExt:DigitalSourceType``, a term of IPTC's Digital Source Type vocabulary: machine-readable marking of AI
  edited media (see ``docs/provenance.md`` for the choice of the default);
- ``xmp:CreatorTool`` (this package and its version), and the edit appended to ``xmpMM:History`` (action, software
  agent, a summary of the parameters, time);
- ``xmpMM:DerivedFrom``, the original: its own XMP document and instance ids, or else the SHA-256 of its file as an
  RFC 6920 ``ni:`` URI; and new ``xmpMM:DocumentID``/``xmpMM:InstanceID`` for the result.

C2PA Content Credentials, signed with the user's certificate, are in :mod:`faithdiff_pipeline.content_credentials`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from .xmp import XmpPacket

SOFTWARE = "faithdiff-pipeline"
IPTC_DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# The terms of IPTC's vocabulary that can describe a FaithDiff result, most fitting first; the others (a camera
# capture, a film scan, human edits, ...) would describe it as something it is not.
DIGITAL_SOURCE_TYPES = ("compositeWithTrainedAlgorithmicMedia", "algorithmicallyEnhanced", "trainedAlgorithmicMedia")
DEFAULT_DIGITAL_SOURCE_TYPE = "compositeWithTrainedAlgorithmicMedia"
EDIT_DESCRIPTION = "FaithDiff super-resolution: detail restored by a generative diffusion model (SDXL)"
# The most XMP one JPEG APP1 segment holds (65,533 bytes less the namespace header Pillow writes before it).
JPEG_XMP_LIMIT = 65533 - 29

# Per-image free text of the recorded parameters: the caption has its own field, and a summary is not the place for
# it; the version is the software agent's.
_NOT_SUMMARISED = ("input", "prompt", "negative_prompt", "caption", "faithdiff_pipeline")
# What other tools pile into a packet, dropped (in this order) only when a JPEG's one segment cannot hold it all.
_BULKY = (
    "photoshop:DocumentAncestors",
    "xmp:Thumbnails",
    "xmpMM:Pantry",
    "xmpMM:Manifest",
    "xmpMM:Ingredients",
    "xmpMM:History",
)
# Properties of the original's packet that would be false of the result.
_ORIENTATION = "tiff:Orientation"
_DIMENSIONS = (("tiff:ImageWidth", "exif:PixelXDimension"), ("tiff:ImageLength", "exif:PixelYDimension"))


def software_agent() -> str:
    """This package and its version, as it signs its edits (``"faithdiff-pipeline 0.1.0"``)."""
    from . import __version__

    return f"{SOFTWARE} {__version__}"


def check_digital_source_type(value: Any, name: str = "digital_source_type") -> str:
    """The IPTC term ``value`` names, given as the term (``"algorithmicallyEnhanced"``) or its URI.

    Raises:
        ValueError: ``value`` is not one of :data:`DIGITAL_SOURCE_TYPES`, by term or URI.
    """
    term = value
    if isinstance(value, str):
        for prefix in (IPTC_DIGITAL_SOURCE_TYPE, IPTC_DIGITAL_SOURCE_TYPE.replace("http:", "https:", 1)):
            if value.startswith(prefix):
                term = value[len(prefix) :]
    if term not in DIGITAL_SOURCE_TYPES:
        raise ValueError(
            f"`{name}` must be one of IPTC's digital source types {DIGITAL_SOURCE_TYPES} (or its URI), got {value!r}."
        )
    return term


def digital_source_type_uri(term: str) -> str:
    """The URI of a term of IPTC's Digital Source Type vocabulary, as XMP and C2PA write it."""
    return IPTC_DIGITAL_SOURCE_TYPE + check_digital_source_type(term, "term")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash_uri(sha256: str) -> str:
    """An RFC 6920 ``ni:`` URI naming content by its SHA-256 (``sha256`` as hex): an identifier anyone holding the
    file can check, where the file carries no id of its own."""
    digest = base64.urlsafe_b64encode(bytes.fromhex(sha256)).rstrip(b"=").decode("ascii")
    return f"ni:///sha-256;{digest}"


def parameter_summary(text: Mapping[str, str] | None) -> dict[str, str]:
    """The settings a result was made with, from the ``text`` :func:`~faithdiff_pipeline.image_io.save_result`
    stores (its ``parameters`` JSON, else its entries), without per-image free text such as the caption."""
    if not text:
        return {}
    entries: Mapping[str, Any] = text
    try:
        recorded = json.loads(text.get("parameters", ""))
    except (json.JSONDecodeError, TypeError):
        recorded = None
    if isinstance(recorded, dict):
        entries = recorded
    return {
        str(key): value if isinstance(value, str) else json.dumps(value)
        for key, value in entries.items()
        if key not in _NOT_SUMMARISED and key != "parameters" and not isinstance(value, (dict, list))
    }


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def result_xmp(
    original: bytes | str | None,
    *,
    media_type: str,
    size: tuple[int, int],
    digital_source_type: str = DEFAULT_DIGITAL_SOURCE_TYPE,
    parameters: Mapping[str, str] | None = None,
    original_sha256: str | None = None,
    when: datetime.datetime | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """The XMP packet of a result: the original's packet with this edit recorded in it (see the module docstring).

    Args:
        original: The original's XMP packet, or ``None``. One that cannot be read is left out, with a warning.
        media_type: The result's MIME type (``dc:format``).
        size: The result's ``(width, height)``, for the original's pixel dimensions where it stated them.
        digital_source_type: A term of :data:`DIGITAL_SOURCE_TYPES` (or its URI).
        parameters: The settings to summarise in the history (see :func:`parameter_summary`).
        original_sha256: The SHA-256 (hex) of the original file, naming it where its packet has no ids.
        when: The time of the edit (timezone-aware); now by default.
        max_bytes: The most the packet may take (a JPEG's segment: :data:`JPEG_XMP_LIMIT`). What other tools piled
            into the original's packet (thumbnails, document ancestors, their history) is dropped until it fits.

    Raises:
        ValueError: the packet cannot be made to fit ``max_bytes``, or an argument is wrong.
    """
    term = check_digital_source_type(digital_source_type)
    when = when or _now()
    if when.tzinfo is None:
        raise ValueError(f"`when` must be timezone-aware (XMP dates state their offset), got {when!r}.")
    packet = _original_packet(original)
    document_id = packet.get("xmpMM:DocumentID")
    instance_id = packet.get("xmpMM:InstanceID")
    hashed = content_hash_uri(original_sha256) if original_sha256 else None
    derived_from = {
        "stRef:instanceID": instance_id or hashed,
        "stRef:documentID": document_id or hashed,
        "stRef:originalDocumentID": packet.get("xmpMM:OriginalDocumentID"),
    }
    derived_from = {key: value for key, value in derived_from.items() if value}
    original_document = packet.get("xmpMM:OriginalDocumentID") or document_id
    new_instance = f"xmp.iid:{uuid.uuid4()}"
    stamp = when.isoformat(timespec="seconds")
    summary = ", ".join(f"{key}={value}" for key, value in parameter_summary(parameters).items())

    def build(drop: tuple[str, ...]) -> bytes:
        edited = XmpPacket.parse(packet.to_bytes())
        # The digest of a JPEG's extended XMP, which Pillow does not read and no result carries.
        for name in ("xmpNote:HasExtendedXMP", *drop):
            edited.remove(name)
        if edited.has(_ORIENTATION):
            # The result is written upright: a stale orientation here would turn it again (Pillow reads this one
            # when EXIF has none).
            edited.set(_ORIENTATION, "1")
        for dimension, names in zip(size, _DIMENSIONS):
            for name in names:
                if edited.has(name):
                    edited.set(name, str(dimension))
        edited.set("Iptc4xmpExt:DigitalSourceType", IPTC_DIGITAL_SOURCE_TYPE + term)
        edited.set("xmp:CreatorTool", software_agent())
        edited.set("xmp:ModifyDate", stamp)
        edited.set("xmp:MetadataDate", stamp)
        edited.set("dc:format", media_type)
        edited.set("xmpMM:DocumentID", f"xmp.did:{uuid.uuid4()}")
        edited.set("xmpMM:InstanceID", new_instance)
        if original_document:
            edited.set("xmpMM:OriginalDocumentID", original_document)
        if derived_from:
            edited.set_struct("xmpMM:DerivedFrom", derived_from)
        else:
            edited.remove("xmpMM:DerivedFrom")
        event = {
            "stEvt:action": "edited",
            "stEvt:instanceID": new_instance,
            "stEvt:when": stamp,
            "stEvt:softwareAgent": software_agent(),
            "stEvt:changed": "/",
        }
        if summary:
            event["stEvt:parameters"] = summary
        edited.append_to_sequence("xmpMM:History", event)
        return edited.to_bytes()

    result = build(())
    for count in range(1, len(_BULKY) + 1):
        if max_bytes is None or len(result) <= max_bytes:
            return result
        result = build(_BULKY[:count])
    if max_bytes is not None and len(result) > max_bytes:
        raise ValueError(
            f"the result's XMP takes {len(result)} bytes, more than the {max_bytes} its format holds; write PNG, "
            "TIFF or WebP, or strip the original's XMP."
        )
    return result


def _original_packet(original: bytes | str | None) -> XmpPacket:
    if not original:
        return XmpPacket()
    try:
        return XmpPacket.parse(original)
    except ValueError as error:
        warnings.warn(f"The original's XMP could not be read ({error}); the result carries only its own.", stacklevel=3)
        return XmpPacket()

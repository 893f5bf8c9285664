"""C2PA Content Credentials: a manifest, signed with the user's certificate, saying what was done to a result and to
which original.

The XMP of :mod:`faithdiff_pipeline.provenance` says the same things but anyone can edit it; a C2PA manifest is bound
to the result's bytes by a hash and signed, so that a verifier (``c2patool``, the Content Credentials site, the
library's ``Reader``) can tell an intact claim from a forged or altered one. The manifest has:

- the original as its parent ingredient (``parentOf``), named by the SHA-256 of its file (an RFC 6920 ``ni:`` URI
  as its instance id); an original that has Content Credentials of its own carries them forward;
- a ``c2pa.opened`` action on that ingredient and a ``c2pa.edited`` action with the IPTC digital source type, a
  description of the edit, our parameters and this package as the software agent.

Signing needs the ``[c2pa]`` extra (c2pa-python, cryptography) and the user's own certificate chain and private key
(PEM). :meth:`SigningCredentials.from_files` checks them all up front, so that a command can refuse them in one line
before any model loads; :func:`~faithdiff_pipeline.image_io.save_result` signs with them (``signing=``), or
:func:`sign_result` signs a result already written. Signing replaces the file atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic_files import atomic_path
from .provenance import (
    DEFAULT_DIGITAL_SOURCE_TYPE,
    EDIT_DESCRIPTION,
    IPTC_DIGITAL_SOURCE_TYPE,
    SOFTWARE,
    content_hash_uri,
    digital_source_type_uri,
    parameter_summary,
)

if TYPE_CHECKING:
    from .image_io import ImageFile

C2PA_INSTALL = "pip install 'faithdiff-pipeline[c2pa]'"
# Where commands read the private key's password from: a password on the command line would show in `ps` and in
# shell histories.
# The file signatures of the formats C2PA signs that we read or write (WebP: RIFF....WEBP, tested apart).
_SIGNATURES = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/tiff": (b"II*\x00", b"MM\x00*"),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/bmp": (b"BM",),
}
_SIGNATURE_BYTES = 12
# A PNG of one black pixel, signed in memory to try credentials before any real work.
_ONE_BLACK_PIXEL_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c49444154789c63606060000000040001f6"
    "1738550000000049454e44ae426082"
)
PASSWORD_VARIABLE = "FAITHDIFF_SIGNING_KEY_PASSWORD"
# Links the c2pa.opened action to the parent ingredient within one manifest.
_PARENT_LABEL = "parent"
# C2PA signs with ECDSA, EdDSA or RSA-PSS: the key's type and curve decide the algorithm.
_EC_ALGORITHMS = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
_MINIMUM_RSA_BITS = 2048


@dataclass(frozen=True)
class SigningCredentials:
    """A certificate chain and its private key, checked, ready to sign Content Credentials.

    Holds PEM bytes rather than c2pa objects, so that it pickles (to Ray or accelerate workers, say). Build it with
    :meth:`from_files`.

    Attributes:
        certificate_chain: PEM certificates, the signer's first, then the CAs that issued it.
        private_key: The signer's private key, PEM (PKCS #8), decrypted. Never shown in ``repr``.
        algorithm: The C2PA signing algorithm the key implies (``"es256"``, ``"es384"``, ``"es512"``, ``"ed25519"``
            or ``"ps256"``).
        timestamp_url: An RFC 3161 time-stamp authority, whose countersignature keeps a signature valid after the
            certificate expires; ``None`` for none (nothing is sent over the network).
        certificate_path: The file the chain was read from, for messages.
    """

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    algorithm: str
    timestamp_url: str | None = None
    certificate_path: Path | None = None

    @classmethod
    def from_files(
        cls,
        certificate_chain: str | os.PathLike,
        private_key: str | os.PathLike,
        password: str | bytes | None = None,
        *,
        timestamp_url: str | None = None,
    ) -> SigningCredentials:
        """Reads and checks a certificate chain and its private key (both PEM).

        Everything signing could trip on is checked here: the ``[c2pa]`` extra, both files, the password, that the
        key belongs to the chain's first certificate, that the certificate is valid now, and a trial signature in
        memory, which C2PA's certificate rules (key usages, extended key usages) either pass or refuse.

        Args:
            certificate_chain: The PEM file of the signer's certificate, followed by the certificates of the CAs
                that issued it.
            private_key: The PEM file of the signer's private key (PKCS #8 or traditional; encrypted or not).
            password: The key's password, for an encrypted key (commands read it from
                ``FAITHDIFF_SIGNING_KEY_PASSWORD``); ``None`` for an unencrypted one.
            timestamp_url: An RFC 3161 time-stamp authority's URL, or ``None``.

        Raises:
            ValueError: one line naming the file and what is wrong with it, or the extra to install.
            TypeError: ``password`` is neither text nor bytes.
        """
        _require_c2pa()
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        if password is not None and not isinstance(password, (str, bytes)):
            raise TypeError(f"`password` must be str, bytes or None, got {type(password).__name__}.")
        if timestamp_url is not None and not (isinstance(timestamp_url, str) and timestamp_url.startswith("http")):
            raise ValueError(f"`timestamp_url` must be an http(s) URL or None, got {timestamp_url!r}.")
        chain_path, key_path = Path(certificate_chain), Path(private_key)
        chain_name, key_name = repr(os.fspath(chain_path)), repr(os.fspath(key_path))
        try:
            certificates = x509.load_pem_x509_certificates(_read(chain_path, "certificate chain"))
        except ValueError as error:
            if str(error).startswith(chain_name):
                raise
            raise ValueError(f"{chain_name} holds no PEM certificate (-----BEGIN CERTIFICATE-----).") from error
        key = _load_key(_read(key_path, "private key"), password, key_name)
        algorithm = _algorithm(key, key_name)
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        signer = certificates[0]
        if key.public_key().public_bytes(serialization.Encoding.DER, public) != signer.public_key().public_bytes(
            serialization.Encoding.DER, public
        ):
            raise ValueError(
                f"{key_name} is not the key of the certificate {chain_name} starts with (the signer's certificate "
                "must come first in the chain)."
            )
        now = datetime.datetime.now(datetime.timezone.utc)
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            raise ValueError(
                f"{chain_name}: the certificate is valid from {signer.not_valid_before_utc:%Y-%m-%d} to "
                f"{signer.not_valid_after_utc:%Y-%m-%d}, not now."
            )
        credentials = cls(
            certificate_chain=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates),
            private_key=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            algorithm=algorithm,
            timestamp_url=timestamp_url,
            certificate_path=chain_path,
        )
        credentials._trial_signature()
        return credentials

    def _signer(self) -> Any:
        import c2pa

        # c2pa takes the key unencrypted: it was decrypted once, in from_files.
        info = c2pa.C2paSignerInfo(self.algorithm, self.certificate_chain, self.private_key, self.timestamp_url)
        return c2pa.Signer.from_info(info)

    def _trial_signature(self) -> None:
        """Signs a 1x1 PNG in memory: C2PA's own checks of the chain (key usages, extended key usages, a chain
        that is not one self-signed certificate) run now rather than after the first restoration."""
        import c2pa

        image = io.BytesIO(_ONE_BLACK_PIXEL_PNG)
        # A black pixel that software made: c2pa.created of algorithmic media is what it is.
        created = {"action": "c2pa.created", "digitalSourceType": IPTC_DIGITAL_SOURCE_TYPE + "algorithmicMedia"}
        manifest = {
            "claim_generator_info": [_generator()],
            "title": "check.png",
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [created]}}],
        }
        try:
            with c2pa.Builder.from_json(manifest) as builder, self._signer() as signer:
                image.seek(0)
                builder.sign(signer, "image/png", image, io.BytesIO())
        except c2pa.C2paError as error:
            where = repr(os.fspath(self.certificate_path)) if self.certificate_path else "the certificate chain"
            reason = _one_line(error)
            raise ValueError(f"{where}: C2PA refuses to sign with this certificate chain ({reason}).") from error


def sign_result(
    result: str | os.PathLike,
    credentials: SigningCredentials,
    original: ImageFile | str | os.PathLike | bytes,
    *,
    digital_source_type: str = DEFAULT_DIGITAL_SOURCE_TYPE,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """Signs a written result's Content Credentials into it, atomically (the signed file replaces it in one rename).

    Args:
        result: The result file (PNG, JPEG, TIFF or WebP).
        credentials: From :meth:`SigningCredentials.from_files`.
        original: The original: the :class:`~faithdiff_pipeline.image_io.ImageFile` it was read as (from a file),
            its path, or its bytes.
        digital_source_type: The IPTC digital source type of the edit (see
            :data:`~faithdiff_pipeline.provenance.DIGITAL_SOURCE_TYPES`).
        parameters: The ``text`` the result was saved with, summarised in the ``c2pa.edited`` action.

    Raises:
        ValueError: the result or the original cannot be read, or signing fails (the message says why).
    """
    result = Path(result)
    media_type = _media_type_of(_read(result, "result")[:_SIGNATURE_BYTES])
    if media_type is None:
        raise ValueError(f"{os.fspath(result)!r}: its format has no MIME type C2PA knows.")
    sign_in_place(
        result,
        media_type,
        credentials,
        original,
        title=result.name,
        digital_source_type=digital_source_type,
        parameters=parameters,
    )
    return result


def sign_in_place(
    path: Path,
    media_type: str,
    credentials: SigningCredentials,
    original: ImageFile | str | os.PathLike | bytes,
    *,
    title: str,
    digital_source_type: str = DEFAULT_DIGITAL_SOURCE_TYPE,
    parameters: Mapping[str, str] | None = None,
) -> None:
    """Signs ``path`` (of ``media_type``) into a temporary file beside it, which then replaces it: what
    :func:`sign_result` and ``save_result(signing=...)`` share. ``title`` is the result's name (``path`` may be a
    temporary one)."""
    import c2pa

    if not isinstance(credentials, SigningCredentials):
        raise TypeError(f"`credentials` must be SigningCredentials, got {type(credentials).__name__}.")
    parent, parent_title = _original_bytes(original)
    parent_type = _media_type_of(parent)
    ingredient = {
        "title": parent_title,
        "relationship": "parentOf",
        "label": _PARENT_LABEL,
        "instance_id": content_hash_uri(hashlib.sha256(parent).hexdigest()),
    }
    agent = _generator()
    edited = {
        "action": "c2pa.edited",
        "digitalSourceType": digital_source_type_uri(digital_source_type),
        "softwareAgent": agent,
        "description": EDIT_DESCRIPTION,
    }
    summary = parameter_summary(parameters)
    if summary:
        edited["parameters"] = summary
    manifest: dict[str, Any] = {
        "claim_generator_info": [agent],
        "title": title,
        "format": media_type,
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.opened",
                            "softwareAgent": agent,
                            "parameters": {"ingredientIds": [_PARENT_LABEL]},
                        },
                        edited,
                    ]
                },
            }
        ],
    }
    # c2pa reads an ingredient it supports from its bytes (its own manifest carried forward, a thumbnail); one it
    # does not (BMP) is described by the manifest alone.
    streamed = parent_type is not None and parent_type in c2pa.Builder.get_supported_mime_types()
    if not streamed:
        manifest["ingredients"] = [{**ingredient, "format": parent_type or "application/octet-stream"}]
    try:
        with c2pa.Builder.from_json(manifest) as builder, credentials._signer() as signer:
            if streamed:
                builder.add_ingredient(ingredient, parent_type, io.BytesIO(parent))
            with atomic_path(path) as signed, open(path, "rb") as source, open(signed, "w+b") as destination:
                builder.sign(signer, media_type, source, destination)
    except c2pa.C2paError as error:
        raise ValueError(f"{title!r}: signing its Content Credentials failed ({_one_line(error)}).") from error


def read_content_credentials(path: str | os.PathLike) -> dict[str, Any] | None:
    """The Content Credentials of a file as c2pa's ``Reader`` reports them (manifests, validation status), or
    ``None`` where it has none."""
    _require_c2pa()
    import c2pa

    try:
        with c2pa.Reader(os.fspath(path)) as reader:
            return json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound:
        return None
    except c2pa.C2paError as error:
        reason = _one_line(error)
        raise ValueError(f"{os.fspath(path)!r}: its Content Credentials could not be read ({reason}).") from error


def _require_c2pa() -> None:
    import importlib.util

    missing = [name for name in ("c2pa", "cryptography") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"Content Credentials need {' and '.join(missing)}: {C2PA_INSTALL}")


def _one_line(error: Exception) -> str:
    # c2pa lists validation failures on lines of their own; commands report errors in one line.
    return " ".join(str(error).split())


def _generator() -> dict[str, str]:
    from . import __version__

    return {"name": SOFTWARE, "version": __version__}


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{os.fspath(path)!r}: the {what} could not be read ({error.strerror or error}).") from error


def _load_key(data: bytes, password: str | bytes | None, name: str) -> Any:
    from cryptography.hazmat.primitives import serialization

    secret = password.encode("utf-8") if isinstance(password, str) else password
    try:
        return serialization.load_pem_private_key(data, password=secret)
    except TypeError as error:
        # cryptography says TypeError for a password missing or superfluous.
        if secret is None:
            raise ValueError(f"{name} is encrypted: give its password (in {PASSWORD_VARIABLE}).") from error
        raise ValueError(f"{name} is not encrypted, but a password was given.") from error
    except ValueError as error:
        if secret is not None:
            raise ValueError(f"{name} could not be decrypted: wrong password, or not a PEM private key.") from error
        raise ValueError(f"{name} holds no PEM private key (-----BEGIN PRIVATE KEY-----).") from error
    except Exception as error:  # cryptography's UnsupportedAlgorithm: a key type it cannot load
        raise ValueError(f"{name} holds no private key cryptography can load ({error}).") from error


def _algorithm(key: Any, name: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGORITHMS:
        return _EC_ALGORITHMS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= _MINIMUM_RSA_BITS:
        return "ps256"
    raise ValueError(
        f"{name}: C2PA signs with EC keys on P-256, P-384 or P-521, Ed25519 keys or RSA keys of at least "
        f"{_MINIMUM_RSA_BITS} bits; this key is {type(key).__name__}"
        + (f" ({key.key_size} bits)." if hasattr(key, "key_size") else ".")
    )


def _original_bytes(original: ImageFile | str | os.PathLike | bytes) -> tuple[bytes, str]:
    """The original file's bytes and name, checked against the hash it was read with."""
    if isinstance(original, (bytes, bytearray, memoryview)):
        return bytes(original), "original"
    if isinstance(original, (str, os.PathLike)):
        return _read(Path(original), "original"), Path(original).name
    path = getattr(original, "path", None)
    if path is None:
        raise ValueError("`original` has no file: pass the ImageFile read_image gave, the original's path or bytes.")
    data = _read(path, "original")
    expected = getattr(original, "sha256", None)
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"{os.fspath(path)!r} changed since it was read: its Content Credentials would name another file."
        )
    return data, path.name


def _media_type_of(data: bytes) -> str | None:
    """The MIME type of the image whose file starts with ``data``, by its signature (C2PA names formats by MIME
    type); ``None`` for a format C2PA does not sign."""
    for media_type, signatures in _SIGNATURES.items():
        if any(data.startswith(signature) for signature in signatures):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None



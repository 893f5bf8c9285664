"""Provenance in the results: the XMP of every format (read back by exiv2, a reader independent of our writer) and
C2PA Content Credentials signed with a throwaway certificate chain (read back by c2pa's Reader)."""

from __future__ import annotations

import datetime
import hashlib
import json
import re

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest

from faithdiff_pipeline import image_io
from faithdiff_pipeline.atomic_files import TEMPORARY_SUFFIX
from faithdiff_pipeline.image_io import OutputOptions, from_pil, read_image, save_result
from faithdiff_pipeline.provenance import (
    DEFAULT_DIGITAL_SOURCE_TYPE,
    IPTC_DIGITAL_SOURCE_TYPE,
    content_hash_uri,
    result_xmp,
)
from faithdiff_pipeline.xmp import XmpPacket

pyexiv2 = pytest.importorskip("pyexiv2")

ORIGINAL_DOCUMENT = "xmp.did:5a1e0c5e-0000-4000-8000-000000000001"
ORIGINAL_INSTANCE = "xmp.iid:5a1e0c5e-0000-4000-8000-000000000002"
ORIGINAL_XMP = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:stEvt="http://ns.adobe.com/xap/1.0/sType/ResourceEvent#" xmlns:album="http://example.com/ns/album/1.0/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
    xmpMM:DocumentID="{ORIGINAL_DOCUMENT}" xmpMM:InstanceID="{ORIGINAL_INSTANCE}"
    photoshop:Headline="Grandmother's cat" album:Page="12">
   <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">© 1962 Ada Lovelace-Smith</rdf:li></rdf:Alt></dc:rights>
   <dc:creator><rdf:Seq><rdf:li>Ada Lovelace-Smith</rdf:li></rdf:Seq></dc:creator>
   <dc:description><rdf:Alt>
    <rdf:li xml:lang="x-default">The cat on the garden wall &amp; the roses</rdf:li>
   </rdf:Alt></dc:description>
   <dc:subject><rdf:Bag><rdf:li>cat</rdf:li><rdf:li>garden</rdf:li><rdf:li>1962</rdf:li></rdf:Bag></dc:subject>
   <xmpMM:History><rdf:Seq>
    <rdf:li stEvt:action="created" stEvt:when="2024-03-01T10:00:00+01:00" stEvt:softwareAgent="ScanTool 2"/>
   </rdf:Seq></xmpMM:History>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>""".encode()
PARAMETERS = {
    "parameters": json.dumps({"input": "cat.jpg", "prompt": "A cat.", "upscale": 2.0, "steps": 20, "seed": 42}),
    "caption": "A cat.",
}
FORMATS = [("png", None), ("png", 16), ("tiff", None), ("tiff", 16), ("jpeg", None), ("webp", None)]


def _photo(size=(24, 16)) -> PIL.Image.Image:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    return PIL.Image.fromarray(np.stack([x * 9, y * 13, (x * y) % 256], axis=-1).astype(np.uint8))


def _restored(size=(48, 32)) -> np.ndarray:
    return np.random.default_rng(0).random((size[1], size[0], 3)).astype(np.float32)


def _xmp_of(path) -> dict:
    """The file's XMP as exiv2 reads it (Adobe's XMP toolkit inside libexiv2)."""
    with pyexiv2.Image(str(path)) as image:
        return image.read_xmp()


def _history(xmp: dict) -> list[dict[str, str]]:
    events: dict[int, dict[str, str]] = {}
    for key, value in xmp.items():
        match = re.fullmatch(r"Xmp\.xmpMM\.History\[(\d+)\]/stEvt:(\w+)", key)
        if match:
            events.setdefault(int(match[1]), {})[match[2]] = value
    return [events[index] for index in sorted(events)]


def _pixels(path) -> np.ndarray:
    """Decoded samples, 16-bit colour through tifffile/imagecodecs (Pillow reads it as 8-bit)."""
    if path.suffix == ".tif":
        import tifffile

        return tifffile.imread(path)
    if path.suffix == ".png":
        import imagecodecs

        return imagecodecs.png_decode(path.read_bytes())
    with PIL.Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture
def original(tmp_path):
    """A JPEG with the XMP of a catalogued scan: rights, creator, description, keywords, ids, a history."""
    path = tmp_path / "cat.jpg"
    _photo().save(path, quality=95, xmp=ORIGINAL_XMP)
    return read_image(path)


# ------------------------------------------------------------------------------------------------------------ XMP


@pytest.mark.parametrize("fmt, bit_depth", FORMATS)
def test_every_format_keeps_the_originals_xmp_and_adds_what_was_done(tmp_path, original, fmt, bit_depth) -> None:
    options = OutputOptions(format=fmt, bit_depth=bit_depth)
    out = save_result(_restored(), tmp_path / f"restored{options.suffix}", original, options, text=PARAMETERS)
    xmp = _xmp_of(out)
    # The original's, merged rather than replaced.
    assert xmp["Xmp.dc.rights"] == {'lang="x-default"': "© 1962 Ada Lovelace-Smith"}
    assert xmp["Xmp.dc.creator"] == ["Ada Lovelace-Smith"]
    assert xmp["Xmp.dc.description"] == {'lang="x-default"': "The cat on the garden wall & the roses"}
    assert xmp["Xmp.dc.subject"] == ["cat", "garden", "1962"]
    assert xmp["Xmp.photoshop.Headline"] == "Grandmother's cat" and xmp["Xmp.album.Page"] == "12"
    # Ours.
    assert xmp["Xmp.iptcExt.DigitalSourceType"] == IPTC_DIGITAL_SOURCE_TYPE + "compositeWithTrainedAlgorithmicMedia"
    assert xmp["Xmp.xmp.CreatorTool"] == "faithdiff-pipeline 0.1.0"
    assert xmp["Xmp.dc.format"] == options.media_type
    first, edit = _history(xmp)
    assert first == {"action": "created", "when": "2024-03-01T10:00:00+01:00", "softwareAgent": "ScanTool 2"}
    assert edit["action"] == "edited" and edit["softwareAgent"] == "faithdiff-pipeline 0.1.0"
    assert edit["parameters"] == "upscale=2.0, steps=20, seed=42"  # no caption, file name or version
    when = datetime.datetime.fromisoformat(edit["when"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - when) < datetime.timedelta(minutes=5)
    assert xmp["Xmp.xmpMM.DerivedFrom/stRef:documentID"] == ORIGINAL_DOCUMENT
    assert xmp["Xmp.xmpMM.DerivedFrom/stRef:instanceID"] == ORIGINAL_INSTANCE
    assert xmp["Xmp.xmpMM.OriginalDocumentID"] == ORIGINAL_DOCUMENT
    assert xmp["Xmp.xmpMM.DocumentID"].startswith("xmp.did:") and xmp["Xmp.xmpMM.DocumentID"] != ORIGINAL_DOCUMENT
    assert xmp["Xmp.xmpMM.InstanceID"] == edit["instanceID"] != ORIGINAL_INSTANCE
    # Our parameters are where they were.
    assert image_io.result_text(out)["parameters"] == PARAMETERS["parameters"]
    if bit_depth == 16:
        assert _pixels(out).dtype == np.uint16


@pytest.mark.parametrize("fmt, bit_depth", FORMATS)
def test_opting_out_writes_no_xmp_and_the_same_pixels(tmp_path, original, fmt, bit_depth) -> None:
    with_provenance = OutputOptions(format=fmt, bit_depth=bit_depth)
    without = OutputOptions(format=fmt, bit_depth=bit_depth, provenance=False)
    marked = save_result(_restored(), tmp_path / f"on{without.suffix}", original, with_provenance, text=PARAMETERS)
    plain = save_result(_restored(), tmp_path / f"off{without.suffix}", original, without, text=PARAMETERS)
    assert _xmp_of(plain) == {} and b"ns.adobe.com/xap" not in plain.read_bytes()
    with PIL.Image.open(plain) as image:
        assert "xmp" not in image.info
    assert np.array_equal(_pixels(marked), _pixels(plain))


@pytest.mark.parametrize("name", ["scan.png", "scan.tif", "scan.webp", "scan16.tif", "scan16.png"])
def test_the_originals_xmp_is_read_from_every_format(tmp_path, name) -> None:
    path = tmp_path / name
    if name == "scan16.tif":
        import tifffile

        pixels = np.full((8, 8, 3), 40000, np.uint16)
        tifffile.imwrite(path, pixels, photometric="rgb", extratags=[(700, 1, len(ORIGINAL_XMP), ORIGINAL_XMP, True)])
    elif name == "scan16.png":
        import imagecodecs

        png = imagecodecs.png_encode(np.full((8, 8, 3), 40000, np.uint16))
        path.write_bytes(image_io._insert_png_chunks(png, [(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + ORIGINAL_XMP)]))
    elif name.endswith(".png"):
        info = PIL.PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", ORIGINAL_XMP.decode())
        _photo().save(path, pnginfo=info)
    elif name.endswith(".tif"):
        exif = PIL.Image.Exif()
        exif[700] = ORIGINAL_XMP
        _photo().save(path, exif=exif)
    else:
        _photo().save(path, xmp=ORIGINAL_XMP)
    loaded = read_image(path)
    assert XmpPacket.parse(loaded.xmp).get("xmpMM:DocumentID") == ORIGINAL_DOCUMENT
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if loaded.exif:  # a TIFF's XMP tag is not carried twice
        kept = PIL.Image.Exif()
        kept.load(loaded.exif)
        assert 700 not in kept
    out = save_result(_restored((16, 16)), tmp_path / "out.jpg", loaded, OutputOptions(format="jpeg"))
    assert _xmp_of(out)["Xmp.dc.subject"] == ["cat", "garden", "1962"]


def test_digital_source_type_default_and_the_alternatives(tmp_path, original) -> None:
    assert OutputOptions().digital_source_type == DEFAULT_DIGITAL_SOURCE_TYPE == "compositeWithTrainedAlgorithmicMedia"
    by_term = OutputOptions(digital_source_type="algorithmicallyEnhanced")
    uri = "https://cv.iptc.org/newscodes/digitalsourcetype/algorithmicallyEnhanced"  # https is accepted too
    by_uri = OutputOptions(digital_source_type=uri)
    assert by_term == by_uri
    out = save_result(_restored(), tmp_path / "enhanced.png", original, by_uri)
    assert _xmp_of(out)["Xmp.iptcExt.DigitalSourceType"] == IPTC_DIGITAL_SOURCE_TYPE + "algorithmicallyEnhanced"
    with pytest.raises(ValueError, match=r"`digital_source_type` must be one of IPTC's .*got 'digitalCapture'"):
        OutputOptions(digital_source_type="digitalCapture")
    with pytest.raises(TypeError, match="`provenance`"):
        OutputOptions(provenance="no")


def test_without_ids_the_original_is_named_by_its_hash_and_without_a_file_not_at_all(tmp_path) -> None:
    path = tmp_path / "plain.png"
    _photo().save(path)
    loaded = read_image(path)
    assert loaded.xmp is None
    xmp = _xmp_of(save_result(_restored(), tmp_path / "a.png", loaded))
    named = content_hash_uri(hashlib.sha256(path.read_bytes()).hexdigest())
    assert named.startswith("ni:///sha-256;") and "=" not in named
    assert xmp["Xmp.xmpMM.DerivedFrom/stRef:documentID"] == xmp["Xmp.xmpMM.DerivedFrom/stRef:instanceID"] == named
    assert "Xmp.xmpMM.OriginalDocumentID" not in xmp
    with PIL.Image.open(path) as image:
        unnamed = _xmp_of(save_result(_restored(), tmp_path / "b.png", from_pil(image)))
    assert not any(key.startswith("Xmp.xmpMM.DerivedFrom") for key in unnamed)
    assert unnamed["Xmp.iptcExt.DigitalSourceType"].endswith("compositeWithTrainedAlgorithmicMedia")
    assert [event["action"] for event in _history(unnamed)] == ["edited"]


def test_an_xmp_orientation_is_reset_and_stale_dimensions_updated(tmp_path) -> None:
    packet = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        'xmlns:exif="http://ns.adobe.com/exif/1.0/" tiff:Orientation="6" exif:PixelXDimension="24">'
        "<tiff:ImageLength>16</tiff:ImageLength></rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    path = tmp_path / "turned.jpg"
    _photo().save(path, xmp=packet)  # no EXIF: Pillow takes the orientation from the XMP
    loaded = read_image(path)
    assert loaded.size == (16, 24)
    out = save_result(_restored((32, 48)), tmp_path / "upright.jpg", loaded, OutputOptions(format="jpeg"))
    xmp = _xmp_of(out)
    assert xmp["Xmp.tiff.Orientation"] == "1"
    assert xmp["Xmp.exif.PixelXDimension"] == "32" and xmp["Xmp.tiff.ImageLength"] == "48"
    assert read_image(out).size == (32, 48)


def test_an_unreadable_original_xmp_is_left_out_with_a_warning(tmp_path) -> None:
    path = tmp_path / "broken.jpg"
    _photo().save(path, xmp=b"<x:xmpmeta><rdf:RDF>not closed")
    loaded = read_image(path)
    with pytest.warns(UserWarning, match="original's XMP could not be read"):
        out = save_result(_restored(), tmp_path / "r.png", loaded)
    assert _xmp_of(out)["Xmp.xmp.CreatorTool"].startswith("faithdiff-pipeline")
    with pytest.raises(ValueError, match="document type declaration"):
        XmpPacket.parse(b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/"/>')


def test_a_jpeg_drops_other_tools_bulk_before_its_one_segment_overflows(tmp_path) -> None:
    bulky = ORIGINAL_XMP.replace(
        b"<dc:rights>",
        b'<photoshop:DocumentAncestors><rdf:Bag>'
        + b"".join(b"<rdf:li>xmp.did:%064d</rdf:li>" % i for i in range(1200))
        + b"</rdf:Bag></photoshop:DocumentAncestors><dc:rights>",
    )
    assert len(bulky) > image_io.JPEG_XMP_LIMIT
    packet = result_xmp(bulky, media_type="image/jpeg", size=(4, 4), max_bytes=image_io.JPEG_XMP_LIMIT)
    kept = XmpPacket.parse(packet)
    assert len(packet) <= image_io.JPEG_XMP_LIMIT and not kept.has("photoshop:DocumentAncestors")
    assert kept.has("dc:rights") and len(kept.get_element("xmpMM:History").find(".//{*}Seq")) == 2
    with pytest.raises(ValueError, match="write PNG, TIFF or WebP"):
        result_xmp(bulky, media_type="image/jpeg", size=(4, 4), max_bytes=500)


# ---------------------------------------------------------------------------------------------- C2PA signing


def _certificate_chain(folder, *, usage="email", expired=False, key_password=None, name="signer"):
    """A throwaway CA and an end-entity certificate for it (P-256), as C2PA requires them: the signer's key usage
    digitalSignature (critical) and an extended key usage c2pa accepts without a trust configuration
    (emailProtection; c2pa-python 0.38 refuses documentSigning there), with key identifiers."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=60), now - datetime.timedelta(days=1)) if expired else (
        now - datetime.timedelta(days=1),
        now + datetime.timedelta(days=30),
    )

    def usages(**chosen):
        flags = dict.fromkeys(
            ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"],
            False,
        )
        return x509.KeyUsage(**{**flags, **chosen})

    def subject(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FaithDiff tests")])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(subject("Test CA")).issuer_name(subject("Test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=90)).not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usages(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    extended = {
        "email": [ExtendedKeyUsageOID.EMAIL_PROTECTION],
        "server": [ExtendedKeyUsageOID.SERVER_AUTH],  # not one C2PA accepts
    }[usage]
    signer = (
        x509.CertificateBuilder().subject_name(subject("Restorer")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usages(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(extended), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain, key_path = folder / f"{name}-chain.pem", folder / f"{name}-key.pem"
    chain.write_bytes(signer.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    encryption = (
        serialization.BestAvailableEncryption(key_password.encode()) if key_password else serialization.NoEncryption()
    )
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return chain, key_path


@pytest.fixture
def credentials(tmp_path):
    pytest.importorskip("c2pa")
    from faithdiff_pipeline.content_credentials import SigningCredentials

    chain, key = _certificate_chain(tmp_path, key_password="correct horse")
    return SigningCredentials.from_files(chain, key, password="correct horse")


def _active(report: dict) -> dict:
    return report["manifests"][report["active_manifest"]]


def _failures(report: dict) -> list[str]:
    return [status["code"] for status in report.get("validation_status", [])]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff", "webp"])
def test_signed_results_verify_and_name_their_parent(tmp_path, original, credentials, fmt) -> None:
    from faithdiff_pipeline.content_credentials import read_content_credentials

    options = OutputOptions(format=fmt, digital_source_type="algorithmicallyEnhanced")
    target = tmp_path / f"restored{options.suffix}"
    out = save_result(_restored(), target, original, options, PARAMETERS, signing=credentials)
    report = read_content_credentials(out)
    # Our throwaway CA is in no trust list; nothing else may fail.
    assert report["validation_state"] == "Valid" and _failures(report) == ["signingCredential.untrusted"]
    manifest = _active(report)
    assert manifest["title"] == out.name and manifest["claim_generator_info"][0]["name"] == "faithdiff-pipeline"
    assert manifest["signature_info"]["common_name"] == "Restorer"
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["title"] == "cat.jpg"
    assert ingredient["instance_id"] == content_hash_uri(hashlib.sha256(original.path.read_bytes()).hexdigest())
    opened, edited = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert opened["action"] == "c2pa.opened" and len(opened["parameters"]["ingredients"]) == 1
    assert edited["action"] == "c2pa.edited"
    assert edited["digitalSourceType"] == IPTC_DIGITAL_SOURCE_TYPE + "algorithmicallyEnhanced"
    assert edited["softwareAgent"] == {"name": "faithdiff-pipeline", "version": "0.1.0"}
    assert edited["parameters"] == {"upscale": "2.0", "steps": "20", "seed": "42"}
    # Signing kept the XMP and the pixels.
    assert _xmp_of(out)["Xmp.iptcExt.DigitalSourceType"].endswith("algorithmicallyEnhanced")
    unsigned = save_result(_restored(), tmp_path / f"plain{options.suffix}", original, options, PARAMETERS)
    assert np.array_equal(_pixels(out), _pixels(unsigned))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMPORARY_SUFFIX)]


def test_an_original_with_content_credentials_carries_them_forward(tmp_path, credentials) -> None:
    from faithdiff_pipeline.content_credentials import read_content_credentials, sign_result

    # A camera's signed photo, simulated: a plain photo signed as an edit of another file.
    first = tmp_path / "first.png"
    _photo().save(first)
    camera = tmp_path / "camera.png"
    _photo((20, 20)).save(camera)
    assert sign_result(camera, credentials, first) == camera
    before = _active(read_content_credentials(camera))
    restored = save_result(_restored(), tmp_path / "restored.png", read_image(camera), signing=credentials)
    report = read_content_credentials(restored)
    assert _failures(report) == ["signingCredential.untrusted"] and len(report["manifests"]) == 2
    (ingredient,) = _active(report)["ingredients"]
    assert ingredient["active_manifest"] == before["label"]
    deltas = report["validation_results"]["ingredientDeltas"][0]["validationDeltas"]
    assert "ingredient.manifest.validated" in [s["code"] for s in deltas["success"]] and not deltas["failure"]


def test_an_original_c2pa_cannot_open_is_described_by_the_manifest(tmp_path, credentials) -> None:
    from faithdiff_pipeline.content_credentials import read_content_credentials

    _photo().save(tmp_path / "old.bmp")
    out = save_result(_restored(), tmp_path / "old.png", read_image(tmp_path / "old.bmp"), signing=credentials)
    report = read_content_credentials(out)
    (ingredient,) = _active(report)["ingredients"]
    assert ingredient["format"] == "image/bmp" and ingredient["relationship"] == "parentOf"
    assert _failures(report) == ["signingCredential.untrusted"]


def test_signing_is_atomic_and_refuses_a_changed_original(tmp_path, original, credentials) -> None:
    from faithdiff_pipeline.content_credentials import read_content_credentials, sign_result

    unsigned = save_result(_restored(), tmp_path / "r.png", original, text=PARAMETERS)
    assert read_content_credentials(unsigned) is None
    original.path.write_bytes(original.path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="changed since it was read"):
        save_result(_restored(), tmp_path / "never.png", original, signing=credentials)
    with pytest.raises(ValueError, match="changed since it was read"):
        sign_result(unsigned, credentials, original)
    assert not (tmp_path / "never.png").exists() and read_content_credentials(unsigned) is None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMPORARY_SUFFIX)]
    with pytest.raises(ValueError, match="`signing` adds provenance"):
        save_result(_restored(), tmp_path / "x.png", original, OutputOptions(provenance=False), signing=credentials)
    with pytest.raises(ValueError, match="`signing` needs `source` read from a file"):
        save_result(_restored(), tmp_path / "x.png", signing=credentials)


def test_credentials_are_checked_up_front_in_one_line_naming_the_file(tmp_path, monkeypatch) -> None:
    pytest.importorskip("c2pa")
    from faithdiff_pipeline.content_credentials import SigningCredentials

    chain, key = _certificate_chain(tmp_path, key_password="secret")
    plain_chain, plain_key = _certificate_chain(tmp_path, name="plain")
    plain = SigningCredentials.from_files(plain_chain, plain_key)
    assert plain.algorithm == "es256" and "PRIVATE" not in repr(plain)
    cases = [
        ((tmp_path / "missing.pem", key, "secret"), r"'.*missing\.pem': the certificate chain could not be read"),
        ((chain, tmp_path / "missing.pem", "secret"), r"'.*missing\.pem': the private key could not be read"),
        ((key, key, "secret"), r"'.*-key\.pem' holds no PEM certificate"),
        ((chain, chain, None), r"'.*signer-chain\.pem' holds no PEM private key"),
        ((chain, key, None), r"'.*signer-key\.pem' is encrypted: give its password \(in FAITHDIFF_SIGNING_KEY_PASS"),
        ((chain, key, "wrong"), r"'.*signer-key\.pem' could not be decrypted: wrong password"),
        ((plain_chain, plain_key, "secret"), r"'.*plain-key\.pem' is not encrypted, but a password was given"),
        ((plain_chain, key, "secret"), r"'.*signer-key\.pem' is not the key of the certificate '.*plain-chain\.pem'"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            SigningCredentials.from_files(*arguments)
        assert "\n" not in str(caught.value)
    expired_chain, expired_key = _certificate_chain(tmp_path, expired=True, name="expired")
    with pytest.raises(ValueError, match=r"'.*expired-chain\.pem': the certificate is valid from .* not now"):
        SigningCredentials.from_files(expired_chain, expired_key)
    server_chain, server_key = _certificate_chain(tmp_path, usage="server", name="server")
    with pytest.raises(ValueError, match=r"'.*server-chain\.pem': C2PA refuses to sign with this certificate chain"):
        SigningCredentials.from_files(server_chain, server_key)
    with pytest.raises(TypeError, match="`password` must be str, bytes or None"):
        SigningCredentials.from_files(chain, key, password=1234)

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "c2pa" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"Content Credentials need c2pa: pip install 'faithdiff-pipeline\[c2pa\]'"):
        SigningCredentials.from_files(chain, key, password="secret")


def test_credentials_pickle_for_workers(credentials) -> None:
    import pickle

    assert pickle.loads(pickle.dumps(credentials)) == credentials


# --------------------------------------------------------------------------------------- the commands' flags

CLI_FAST = ["--steps", "2", "--tile-size", "64", "--device", "cpu", "--dtype", "float32", "--prompt", "x"]


def test_upscale_signs_with_sign_and_leaves_provenance_out_with_no_provenance(
    tiny_model_dir, tmp_path, monkeypatch, capsys
) -> None:
    pytest.importorskip("c2pa")
    from faithdiff_pipeline.cli import main
    from faithdiff_pipeline.content_credentials import PASSWORD_VARIABLE, read_content_credentials

    _photo().save(tmp_path / "cat.png")
    chain, key = _certificate_chain(tmp_path, key_password="correct horse")
    monkeypatch.setenv(PASSWORD_VARIABLE, "correct horse")
    common = [str(tmp_path / "cat.png"), "--model", str(tiny_model_dir), *CLI_FAST]
    assert main([*common, "-o", str(tmp_path / "signed"), "--sign", str(chain), str(key),
                 "--digital-source-type", "algorithmicallyEnhanced"]) == 0
    report = read_content_credentials(tmp_path / "signed" / "cat.png")
    assert _failures(report) == ["signingCredential.untrusted"]
    (ingredient,) = _active(report)["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["title"] == "cat.png"
    assert _xmp_of(tmp_path / "signed" / "cat.png")["Xmp.iptcExt.DigitalSourceType"].endswith("algorithmicallyEnhanced")
    assert main([*common, "-o", str(tmp_path / "plain"), "--no-provenance"]) == 0
    assert not _xmp_of(tmp_path / "plain" / "cat.png")
    assert np.array_equal(_pixels(tmp_path / "plain" / "cat.png"), _pixels(tmp_path / "signed" / "cat.png"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: [str(tmp / "missing.pem"), str(tmp / "missing-key.pem")], "missing.pem"),
        (lambda tmp: [str(p) for p in _certificate_chain(tmp, key_password="secret")], "password"),
    ],
)
def test_signing_mistakes_are_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, make, message) -> None:
    pytest.importorskip("c2pa")
    from faithdiff_pipeline import loading
    from faithdiff_pipeline.cli import main
    from faithdiff_pipeline.content_credentials import PASSWORD_VARIABLE

    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    _photo().save(tmp_path / "cat.png")
    assert main([str(tmp_path / "cat.png"), "-o", str(tmp_path / "out"), *CLI_FAST, "--sign", *make(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("faithdiff-upscale: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "cat.png"), *CLI_FAST, "--sign", "a", "b", "--no-provenance"]) == 2
    assert "--sign adds provenance, which --no-provenance leaves out" in capsys.readouterr().err

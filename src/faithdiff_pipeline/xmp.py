"""XMP packets (Adobe's Extensible Metadata Platform, ISO 16684-1), read, edited and written with the standard library.

An XMP packet is RDF/XML: properties of the image are attributes or child elements of ``rdf:Description`` elements
under ``rdf:RDF``. :class:`XmpPacket` keeps a packet as an element tree, so that everything in it (rights, creators,
keywords, another tool's history) survives an edit, and changes only the properties it is asked to change.

ElementTree forgets the prefixes a document gave its namespaces; the packet remembers them and writes them back, since
XMP's prefixes are conventional names that people and some readers (Pillow's lookup of ``tiff:Orientation``) match
as text.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping

# The namespaces this package reads or writes, by their conventional prefix.
NAMESPACES: dict[str, str] = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "xmpNote": "http://ns.adobe.com/xmp/note/",
    "stEvt": "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#",
    "stRef": "http://ns.adobe.com/xap/1.0/sType/ResourceRef#",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
}
_XML_NAMESPACE = "http://www.w3.org/XML/1998/namespace"
# The packet wrapper's id is fixed by the XMP specification; "w" marks the packet as writable in place.
_PACKET_START = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
_PACKET_END = '\n<?xpacket end="w"?>'
_INDENT = " "


def qualified(name: str) -> str:
    """ElementTree's ``{namespace}local`` form of a prefixed XMP name such as ``"xmpMM:History"``."""
    prefix, _, local = name.partition(":")
    if not local or prefix not in NAMESPACES:
        raise ValueError(f"`name` must be 'prefix:local' with a prefix of {tuple(NAMESPACES)}, got {name!r}.")
    return f"{{{NAMESPACES[prefix]}}}{local}"


_RDF = f"{{{NAMESPACES['rdf']}}}"
_DESCRIPTION, _RDF_ROOT, _LI, _SEQ = _RDF + "Description", _RDF + "RDF", _RDF + "li", _RDF + "Seq"
_PARSE_TYPE, _ABOUT, _RESOURCE = _RDF + "parseType", _RDF + "about", _RDF + "resource"


class XmpPacket:
    """One XMP packet: its ``rdf:RDF`` element and the prefixes of its namespaces.

    Properties are named with the prefixes of :data:`NAMESPACES` (``"dc:rights"``, ``"xmpMM:InstanceID"``),
    whatever prefixes the packet itself uses.
    """

    def __init__(self, rdf: ET.Element | None = None, prefixes: Mapping[str, str] | None = None) -> None:
        self.rdf = rdf if rdf is not None else ET.Element(_RDF_ROOT)
        # Namespace -> prefix, as the packet spelled them.
        self.prefixes = dict(prefixes or {})

    @classmethod
    def parse(cls, packet: bytes | str) -> XmpPacket:
        """Reads a packet (with or without its ``<?xpacket?>`` wrapper and padding).

        Raises:
            ValueError: ``packet`` is not well-formed XML, has a document type declaration, or has no ``rdf:RDF``.
        """
        data = packet.encode("utf-8") if isinstance(packet, str) else bytes(packet)
        data = data.strip(b"\0 \t\r\n")
        # XMP forbids DTDs; refusing them up front also rules out entity-expansion attacks from a crafted file.
        if re.search(rb"<!(DOCTYPE|ENTITY)", data):
            raise ValueError("`packet` has a document type declaration, which XMP does not allow.")
        parser = ET.XMLPullParser(events=("start-ns", "start"))
        prefixes: dict[str, str] = {}
        root = None
        try:
            parser.feed(data)
            parser.close()
        except ET.ParseError as error:
            raise ValueError(f"`packet` is not well-formed XML ({error}).") from error
        for event, item in parser.read_events():
            if event == "start-ns":
                prefix, uri = item
                if prefix:
                    prefixes.setdefault(uri, prefix)
            elif root is None:
                root = item
        rdf = root if root is not None and root.tag == _RDF_ROOT else None
        if rdf is None and root is not None:
            rdf = root.find(f".//{_RDF_ROOT}")
        if rdf is None:
            raise ValueError("`packet` has no rdf:RDF element: it is not XMP.")
        return cls(rdf, prefixes)

    # ------------------------------------------------------------------------------------------------ reading

    def descriptions(self) -> list[ET.Element]:
        """The top-level ``rdf:Description`` elements, whose attributes and children are the properties."""
        return [child for child in self.rdf if child.tag == _DESCRIPTION]

    def get(self, name: str) -> str | None:
        """A simple property's value (attribute or element form), or ``None`` where it is absent or not simple."""
        tag = qualified(name)
        for description in self.descriptions():
            if tag in description.attrib:
                return description.attrib[tag]
            element = description.find(tag)
            if element is not None:
                if _RESOURCE in element.attrib:
                    return element.attrib[_RESOURCE]
                if len(element) == 0:
                    return (element.text or "").strip()
        return None

    def get_element(self, name: str) -> ET.Element | None:
        """A property's element, for structured values (arrays, structs), or ``None``."""
        tag = qualified(name)
        for description in self.descriptions():
            element = description.find(tag)
            if element is not None:
                return element
        return None

    def has(self, name: str) -> bool:
        tag = qualified(name)
        return any(tag in d.attrib or d.find(tag) is not None for d in self.descriptions())

    # ------------------------------------------------------------------------------------------------ writing

    def remove(self, name: str) -> None:
        """Removes a property, in whichever form and description it is."""
        tag = qualified(name)
        for description in self.descriptions():
            description.attrib.pop(tag, None)
            for element in description.findall(tag):
                description.remove(element)

    def set(self, name: str, value: str) -> None:
        """Sets a simple (text) property, replacing any value it had."""
        self.remove(name)
        ET.SubElement(self._own_description(), qualified(name)).text = value

    def set_struct(self, name: str, fields: Mapping[str, str]) -> None:
        """Sets a struct property (such as ``xmpMM:DerivedFrom``) to ``fields`` (prefixed field name -> text)."""
        self.remove(name)
        element = ET.SubElement(self._own_description(), qualified(name), {_PARSE_TYPE: "Resource"})
        _add_fields(element, fields)

    def append_to_sequence(self, name: str, fields: Mapping[str, str]) -> None:
        """Appends a struct item to an ordered array property (such as ``xmpMM:History``), keeping its items."""
        element = self.get_element(name)
        sequence = element.find(_SEQ) if element is not None else None
        if sequence is None:
            # Absent, or not the array it should be: a history we cannot extend is replaced rather than broken.
            self.remove(name)
            element = ET.SubElement(self._own_description(), qualified(name))
            sequence = ET.SubElement(element, _SEQ)
        item = ET.SubElement(sequence, _LI, {_PARSE_TYPE: "Resource"})
        _add_fields(item, fields)

    def _own_description(self) -> ET.Element:
        descriptions = self.descriptions()
        if descriptions:
            return descriptions[0]
        return ET.SubElement(self.rdf, _DESCRIPTION, {_ABOUT: ""})

    # -------------------------------------------------------------------------------------------- serialising

    def to_bytes(self) -> bytes:
        """The packet as UTF-8, in its ``<?xpacket?>`` wrapper, inside ``x:xmpmeta``."""
        used = {NAMESPACES["x"], *_namespaces(self.rdf)}
        prefixes = _assign_prefixes(used, self.prefixes)
        declarations = "".join(f' xmlns:{prefixes[uri]}="{_escape(uri, True)}"' for uri in sorted(used))
        lines = [f"<x:xmpmeta{declarations}>"]
        _write(self.rdf, prefixes, 1, lines)
        lines.append("</x:xmpmeta>")
        return (_PACKET_START + "\n".join(lines) + _PACKET_END).encode("utf-8")


def _add_fields(parent: ET.Element, fields: Mapping[str, str]) -> None:
    for field_name, value in fields.items():
        ET.SubElement(parent, qualified(field_name)).text = value


def _split(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        uri, _, local = tag[1:].partition("}")
        return uri, local
    return None, tag


def _namespaces(element: ET.Element) -> Iterator[str]:
    for node in element.iter():
        for name in (node.tag, *node.attrib):
            uri, _ = _split(name)
            if uri is not None and uri != _XML_NAMESPACE:
                yield uri


def _assign_prefixes(uris: set[str], preferred: Mapping[str, str]) -> dict[str, str]:
    """A distinct prefix for each namespace: the packet's own, else the conventional one, else a made-up one."""
    conventional = {uri: prefix for prefix, uri in NAMESPACES.items()}
    taken: set[str] = {"xml"}
    assigned: dict[str, str] = {}
    for uri in sorted(uris, key=lambda u: (u not in preferred, u not in conventional, u)):
        prefix = preferred.get(uri) or conventional.get(uri) or "ns"
        candidate, counter = prefix, 1
        while candidate in taken:
            candidate, counter = f"{prefix}{counter}", counter + 1
        taken.add(candidate)
        assigned[uri] = candidate
    return assigned


def _name(tag: str, prefixes: Mapping[str, str]) -> str:
    uri, local = _split(tag)
    if uri is None:
        return local
    if uri == _XML_NAMESPACE:
        return f"xml:{local}"
    return f"{prefixes[uri]}:{local}"


def _escape(text: str, attribute: bool = False) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if attribute:
        # Attribute values are normalised by XML parsers: keep line breaks and tabs as references.
        text = text.replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
    return text


def _write(element: ET.Element, prefixes: Mapping[str, str], depth: int, lines: list[str]) -> None:
    indent = _INDENT * depth
    name = _name(element.tag, prefixes)
    attributes = "".join(f' {_name(k, prefixes)}="{_escape(v, True)}"' for k, v in element.attrib.items())
    if len(element) == 0:
        text = element.text or ""
        if text:
            lines.append(f"{indent}<{name}{attributes}>{_escape(text)}</{name}>")
        else:
            lines.append(f"{indent}<{name}{attributes}/>")
        return
    # Whitespace between the children of an element with element content is not part of any value in RDF.
    lines.append(f"{indent}<{name}{attributes}>")
    for child in element:
        _write(child, prefixes, depth + 1, lines)
    lines.append(f"{indent}</{name}>")

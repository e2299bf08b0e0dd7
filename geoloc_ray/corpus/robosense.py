"""RoboSense 2025 Track 4: a queries file (`q_00001<TAB>text`) and a flat gallery of `image_<8hex>.jpeg`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from geoloc_ray import io
from geoloc_ray.corpus.records import MalformedRecord

GALLERY_NAME = re.compile(r"^image_[0-9a-fA-F]{8}\.(?:jpe?g|png)$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str


@dataclass(frozen=True)
class GalleryImage:
    """A gallery image with platform and location hidden: only its id (file stem) and where it is."""

    image_id: str
    image_uri: str


def read_queries(uri: str) -> list[Query]:
    """Parse the queries file; a malformed line raises naming the file and line number."""
    queries: list[Query] = []
    seen: set[str] = set()
    for lineno, line in enumerate(io.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise MalformedRecord(uri, f"line {lineno}", "expected 'QUERY_ID<TAB>TEXT'")
        qid, text = line.split("\t", 1)
        qid, text = qid.strip(), text.strip()
        if not qid or not text:
            raise MalformedRecord(uri, f"line {lineno}", "empty query id or text")
        if qid in seen:
            raise MalformedRecord(uri, f"line {lineno}", f"duplicate query id {qid!r}")
        seen.add(qid)
        queries.append(Query(qid, text))
    if not queries:
        raise MalformedRecord(uri, "file", "no queries")
    return queries


def list_gallery(uri: str, strict_names: bool = False) -> list[GalleryImage]:
    """Every image file of the flat gallery folder; ids are file names without extension."""
    images = []
    for path in io.listdir(uri):
        name = path.rstrip("/").split("/")[-1]
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if strict_names and not GALLERY_NAME.match(name):
            raise MalformedRecord(uri, name, "gallery file name is not image_<8hex>.jpeg")
        images.append(GalleryImage(image_id=name.rsplit(".", 1)[0], image_uri=path))
    if not images:
        raise MalformedRecord(uri, "folder", "no images in gallery")
    return images

"""Datasets as records: the manifest CSV, the Exact Street2Shop layout, class-per-folder sets.

Every reader returns :class:`Record` objects (an image, its product, domain,
split, category and optional box); ``pairs`` and ``pipeline`` take it from there.
"""

from street2shop.data.image import Box
from street2shop.data.records import Record, RecordSet, read_manifest_csv, write_manifest
from street2shop.data.folders import LabelledSet, read_class_folders
from street2shop.data.street2shop import read_street2shop

__all__ = [
    "Box",
    "LabelledSet",
    "Record",
    "RecordSet",
    "read_class_folders",
    "read_manifest_csv",
    "read_street2shop",
    "write_manifest",
]

"""The output's Hugging Face `datasets` features, as Parquet schema metadata: the files open as an image dataset.

`datasets` reads a Parquet file's schema metadata key `huggingface` ({"info": {"features": ...}}) and uses a
feature only where its Arrow type is exactly the column's type. So the `png` column is stored the way
`datasets.Image` stores images, a struct {bytes: binary, path: string}, and `class_label` (int64) becomes a
`ClassLabel` when the class names are known. Columns without an entry are inferred from their Arrow type.

Pure functions of Arrow schemas and values; `datasets` itself is not needed to write the files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

METADATA_KEY = b"huggingface"
IMAGE_COLUMN = "png"
CLASS_COLUMN = "class_label"
# datasets.Image's storage type. pandas and ray.data read it as {"bytes": ..., "path": ...} per row.
PNG_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def features(schema: pa.Schema, class_names: Sequence[str] | None = None) -> dict:
    """The `features` of the columns `datasets` should not infer: the image, and the class label when named."""
    out = {}
    if IMAGE_COLUMN in schema.names and schema.field(IMAGE_COLUMN).type == PNG_TYPE:
        out[IMAGE_COLUMN] = {"_type": "Image"}
    if class_names and CLASS_COLUMN in schema.names and schema.field(CLASS_COLUMN).type == pa.int64():
        out[CLASS_COLUMN] = {"_type": "ClassLabel", "names": [str(name) for name in class_names]}
    return out


def with_metadata(schema: pa.Schema, class_names: Sequence[str] | None = None) -> pa.Schema:
    """`schema` with the `huggingface` metadata key set (other keys kept)."""
    info = {"info": {"features": features(schema, class_names)}}
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(info).encode()})


def class_names(schema: pa.Schema) -> list[str] | None:
    """The ClassLabel names a schema's metadata carries, if any (so that metadata survives a schema rebuild)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    feature = json.loads(raw).get("info", {}).get("features", {}).get(CLASS_COLUMN, {})
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" else None


def png_array(images: Sequence[bytes | None], ids: Sequence[str | None]) -> pa.Array:
    """PNG bytes as the `png` column: {bytes, path = '<id>.png'}; a missing image (error row) is null."""
    values = [
        None if data is None else {"bytes": data, "path": f"{image_id}.png" if image_id is not None else None}
        for data, image_id in zip(images, ids, strict=True)
    ]
    return pa.array(values, PNG_TYPE)


def png_bytes(value) -> bytes | None:
    """One `png` cell as bytes, whichever shape it was written in (binary before the struct, or the struct)."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return value
    return value.get("bytes")

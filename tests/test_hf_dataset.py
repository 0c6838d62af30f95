"""The generation output opens as a Hugging Face image dataset, and stays readable by pandas and Ray Data."""

from __future__ import annotations

import glob
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import hf_features
from jobs.generate import run_generate
from jobs.manifest import ManifestSchema, class_manifest
from pipelines import digits
from pipelines.build import GeneratorConfig

DIGITS = GeneratorConfig(model="digits", num_inference_steps=4, device="cpu")


def test_features_describe_the_image_and_named_classes():
    schema = pa.schema([("id", pa.string()), ("class_label", pa.int64()), ("png", hf_features.PNG_TYPE)])
    assert hf_features.features(schema, ["zero", "one"]) == {
        "png": {"_type": "Image"},
        "class_label": {"_type": "ClassLabel", "names": ["zero", "one"]},
    }
    assert hf_features.features(schema) == {"png": {"_type": "Image"}}  # unnamed classes stay integers
    named = hf_features.with_metadata(schema.with_metadata({b"other": b"kept"}), ["zero", "one"])
    assert named.metadata[b"other"] == b"kept" and hf_features.class_names(named) == ["zero", "one"]
    # A binary png column is not an Image to datasets (the types must match exactly): no entry for it.
    assert hf_features.features(pa.schema([("png", pa.binary())])) == {}


def test_png_cells_read_as_bytes_in_either_shape():
    column = hf_features.png_array([b"\x89PNG", None], ["a", "b"])
    assert column.to_pylist() == [{"bytes": b"\x89PNG", "path": "a.png"}, None]
    assert [hf_features.png_bytes(v) for v in column.to_pylist()] == [b"\x89PNG", None]
    assert hf_features.png_bytes(b"raw") == b"raw"


@pytest.fixture(scope="module")
def digits_output(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "digits"
    manifest = class_manifest([3, 7], per_class=2, seed=0)
    summary = run_generate(manifest, str(out), DIGITS, schema=ManifestSchema("class_label", num_classes=10),
                           batch_size=4)  # fmt: skip
    assert summary.complete
    return out


def test_output_loads_with_datasets_as_images_and_class_labels(digits_output, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted(glob.glob(str(digits_output / "*.parquet")))
    metadata = json.loads(pq.read_schema(files[0]).metadata[b"huggingface"])
    assert metadata["info"]["features"]["png"] == {"_type": "Image"}

    dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(dataset.features["png"], datasets.Image)  # no cast needed
    labels = dataset.features["class_label"]
    assert isinstance(labels, datasets.ClassLabel) and labels.names == [str(d) for d in range(digits.NUM_CLASSES)]
    row = dataset.sort("id")[0]
    assert isinstance(row["png"], Image.Image) and row["png"].size == (16, 16)
    assert labels.int2str(row["class_label"]) == "3"


def test_output_stays_readable_by_pandas_and_ray_data(digits_output, ray_local):
    import pandas as pd
    import ray.data

    frame = pd.read_parquet(digits_output)
    assert len(frame) == 4 and set(frame["class_label"]) == {3, 7}
    first = frame.sort_values("id").iloc[0]["png"]
    assert first["path"] == f"{frame.sort_values('id').iloc[0]['id']}.png"
    with Image.open(io.BytesIO(first["bytes"])) as image:
        assert image.size == (16, 16)

    rows = ray.data.read_parquet(str(digits_output)).take_all()
    assert len(rows) == 4 and all(hf_features.png_bytes(r["png"]).startswith(b"\x89PNG") for r in rows)

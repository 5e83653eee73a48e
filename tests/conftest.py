"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def runtime_choice_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of runtime choices (`deeplab.deploy.choice`): none read from the user's cache folder,
    none left there, none carried from one test to the next."""
    monkeypatch.setenv("DEEPLAB_CACHE_DIR", str(tmp_path_factory.mktemp("deeplab-cache")))


@pytest.fixture(scope="module")
def one_thread():
    """PyTorch at one intra-op thread for a module: the 2 cores are shared with other test runs, and more threads
    only add contention at the tests' sizes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def classified_tiles():
    """A function writing a small ArcGIS Pro "Classified Tiles" export with exactly the files ArcGIS writes (images/,
    labels/, map.txt with Windows backslashes, esri_accumulated_stats.json, esri_model_definition.emd): chips of a
    stripe, a disc and a background, labelled with the class Values given (not consecutive by default), a 2-row band
    of NoData (0) at the top, and each class a distinct brightness in every band plus noise."""
    import json
    from pathlib import Path

    import numpy as np

    def write(root: Path, *, n: int = 8, size: int = 32, bands: int = 4, dtype: str = "uint16",
              values: tuple[int, ...] = (1, 3, 7), names: tuple[str, ...] = ("water", "field", "forest"),
              colors=((0, 0, 255), (-1, -1, -1), (0, 128, 0)), chip: str = ".tif", seed: int = 0) -> Path:
        rasterio = pytest.importorskip("rasterio", reason="writing TIFF chips needs rasterio: pip install 'deeplab[geo]'")
        import warnings
        root = Path(root)
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        rng = np.random.default_rng(seed)
        scale = 1000 if dtype == "uint16" else (60 if dtype == "uint8" else 0.2)
        yy, xx = np.mgrid[:size, :size]
        lines = []
        for k in range(n):
            label = np.full((size, size), values[0], np.uint8)
            label[(xx + 3 * k) % size < size // 3] = values[1]
            label[(yy - size // 2) ** 2 + (xx - size // 2 - k % 3) ** 2 < (size // 4) ** 2] = values[2]
            label[:2] = 0  # NoData
            image = np.zeros((bands, size, size))
            for i, v in enumerate(values):
                image[:, label == v] = (i + 1) * scale
            image += rng.normal(0, scale / 10, image.shape)
            image = np.clip(image, 0, None).astype(dtype)
            name = f"{k:09d}{chip}"
            if chip == ".tif":
                for path, data in ((root / "images" / name, image), (root / "labels" / name, label[None])):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # chips have none
                        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=len(data),
                                           dtype=data.dtype) as dst:
                            dst.write(data)
            else:
                from PIL import Image

                Image.fromarray(image.transpose(1, 2, 0)).save(root / "images" / name)
                Image.fromarray(label).save(root / "labels" / name)
            lines.append(f"images\\{name} labels\\{name}")
        (root / "map.txt").write_text("\n".join(lines) + "\n")
        (root / "esri_accumulated_stats.json").write_text(json.dumps({
            "MetaDataMode": "Classified_Tiles", "NumBands": bands, "TileSizeX": size, "TileSizeY": size,
            "NumTiles": n, "NumClasses": len(values),
            "Classes": [{"ClassValue": v, "ClassName": c} for v, c in zip(values, names)],
            "ClassPixelStats": {"NumImagesTotal": n, "NumImagesPerClass": [n] * len(values),
                                "NumPixelsPerClass": [1000] * len(values)},
        }))
        (root / "esri_model_definition.emd").write_text(json.dumps({
            "Framework": "PyTorch", "ModelConfiguration": "DeepLab", "ImageHeight": size, "ImageWidth": size,
            "Classes": [{"Value": v, "Name": c, "Color": list(rgb)} for v, c, rgb in zip(values, names, colors)],
            "InputRastersProps": {"BandNames": ["Red", "Green", "Blue", "NearInfrared"][:bands]},
        }))
        return root

    return write

#!/usr/bin/env python3
"""Generate the tiny scene fixtures in this folder (seeded; run from anywhere).

One 12 x 10 x 6 int16 cube and its label map (ids 1, 10, 11 like SalinasA's non-contiguous ids, 0 =
unlabeled) written in every format the readers take, with real file-name patterns:

* ``tiny_v5.mat`` (MATLAB v5: cube ``tiny`` + labels ``tiny_gt``), ``two_cubes.mat`` (two 3-D arrays)
* ``tiny_v73.mat`` (MATLAB v7.3 = HDF5 with a 512-byte user block, arrays stored transposed)
* ``tiny.npy``, ``tiny.npz`` (``cube``, ``gt``), ``tiny_gt.npy``
* ENVI ``tiny_bsq.img``/``.hdr``, ``tiny_bil.dat``/``.hdr``, ``tiny_bip.bip``/``.hdr`` (wavelengths in
  micrometres in the BIL header, nanometres in the others)
* GeoTIFF ``tiny.tif`` (EPSG:32632, 30 m pixels) and ``tiny_gt.tif``
* official-split pairs: ``TrainImage.mat``/``TestImage.mat`` (Augsburg-style keys and dtypes) and
  ``tiny_TR.tif``/``tiny_VA.tif`` (GRSS DFC 2013-style)
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import rasterio
import scipy.io
from rasterio.transform import from_origin

HERE = Path(__file__).resolve().parent
H, W, B = 12, 10, 6
WAVELENGTHS_NM = np.array([450.0, 500.0, 550.0, 600.0, 650.0, 700.0])


def make_cube() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20261124)
    cube = rng.integers(-9, 8000, size=(H, W, B)).astype(np.int16)
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[:, :4] = 1
    labels[:6, 4:] = 10
    labels[6:, 4:] = 11
    labels[0, :] = 0  # an unlabeled row, like real ground truth
    return cube, labels


def write_mat_v73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """MATLAB v7.3: HDF5 with a 512-byte text header; MATLAB's column-major order reverses axes."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in arrays.items():
            f.create_dataset(name, data=np.ascontiguousarray(arr.T))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Tue Nov 24 00:00:00 2026 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")


def write_envi(
    stem: str, data_suffix: str, cube: np.ndarray, interleave: str, micrometres: bool
) -> None:
    order = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
    cube.transpose(order).astype("<i2").tofile(HERE / f"{stem}{data_suffix}")
    wl = WAVELENGTHS_NM / 1000.0 if micrometres else WAVELENGTHS_NM
    unit = "Micrometers" if micrometres else "Nanometers"
    header = (
        "ENVI\n"
        "description = {hsicache test fixture}\n"
        f"samples = {W}\nlines = {H}\nbands = {B}\nheader offset = 0\n"
        "file type = ENVI Standard\ndata type = 2\n"
        f"interleave = {interleave}\nbyte order = 0\n"
        f"wavelength units = {unit}\n"
        "wavelength = {" + ", ".join(f"{v:g}" for v in wl) + "}\n"
    )
    (HERE / f"{stem}.hdr").write_text(header)


def write_tif(path: Path, arr: np.ndarray) -> None:
    data = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    with rasterio.open(
        path, "w", driver="GTiff", height=H, width=W, count=data.shape[0], dtype=data.dtype,
        crs="EPSG:32632", transform=from_origin(600000.0, 5360000.0, 30.0, 30.0),
    ) as ds:  # fmt: skip
        ds.write(data)


def write_mat_v5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``scipy.io.savemat`` with a fixed header text in place of its "Created on" date, so that
    running this script again gives the same bytes."""
    scipy.io.savemat(path, arrays)
    with path.open("r+b") as f:
        f.write(b"MATLAB 5.0 MAT-file, written by tests/data/scenes/make.py".ljust(116))


def main() -> None:
    cube, labels = make_cube()
    write_mat_v5(HERE / "tiny_v5.mat", {"tiny": cube, "tiny_gt": labels})
    write_mat_v5(HERE / "two_cubes.mat", {"radiance": cube, "reflectance": cube // 2})
    write_mat_v73(HERE / "tiny_v73.mat", {"tiny": cube, "tiny_gt": labels})
    np.save(HERE / "tiny.npy", cube)
    np.save(HERE / "tiny_gt.npy", labels)
    np.savez(HERE / "tiny.npz", cube=cube, gt=labels)
    write_envi("tiny_bsq", ".img", cube, "bsq", micrometres=False)
    write_envi("tiny_bil", ".dat", cube, "bil", micrometres=True)
    write_envi("tiny_bip", ".bip", cube, "bip", micrometres=False)
    write_tif(HERE / "tiny.tif", cube)
    write_tif(HERE / "tiny_gt.tif", labels)
    # official split: every other labeled column to train, the rest to test
    cols = np.arange(W)[None, :]
    train = np.where((labels > 0) & (cols % 3 == 0), labels, 0).astype(np.uint8)
    test = np.where((labels > 0) & (cols % 3 != 0), labels, 0)
    write_mat_v5(HERE / "TrainImage.mat", {"TrainImage": train})
    write_mat_v5(HERE / "TestImage.mat", {"TestImage": test.astype(np.float32)})
    write_tif(HERE / "tiny_TR.tif", train)
    write_tif(HERE / "tiny_VA.tif", test.astype(np.uint8))


if __name__ == "__main__":
    main()

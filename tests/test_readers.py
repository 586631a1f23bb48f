from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import KeyAmbiguityError, SceneFormatError, SceneNotFoundError
from pipeline.scene.readers import read_cube, read_map

CUBE_FILES = [
    "tiny_v5.mat",
    "tiny_v73.mat",
    "tiny.npy",
    "tiny.npz",
    "tiny_bsq.img",
    "tiny_bsq.hdr",
    "tiny_bil.hdr",
    "tiny_bip.bip",
    "tiny.tif",
]
MAP_FILES = ["tiny_v5.mat", "tiny_v73.mat", "tiny.npz", "tiny_gt.npy", "tiny_gt.tif"]


class TestReadCube:
    @pytest.mark.parametrize("name", CUBE_FILES)
    def test_every_format_gives_the_same_cube(self, scenes, name):
        ref = np.load(scenes / "tiny.npy")
        raster = read_cube(scenes / name)
        assert raster.data.shape == (12, 10, 6)
        assert raster.data.dtype == np.int16
        np.testing.assert_array_equal(raster.data, ref)

    def test_mat_v73_is_transposed_back(self, scenes):
        # h5py sees MATLAB's (bands, width, height); the reader must give (height, width, bands)
        raster = read_cube(scenes / "tiny_v73.mat")
        assert raster.key == "tiny"
        assert raster.data.flags["C_CONTIGUOUS"]

    @pytest.mark.parametrize("name", ["tiny_bsq.hdr", "tiny_bil.hdr", "tiny_bip.bip"])
    def test_envi_wavelengths_in_nanometres(self, scenes, name):
        raster = read_cube(scenes / name)
        np.testing.assert_allclose(raster.wavelengths, [450, 500, 550, 600, 650, 700])

    def test_geotiff_keeps_crs_and_transform(self, scenes):
        raster = read_cube(scenes / "tiny.tif")
        assert "32632" in raster.crs or "UTM zone 32N" in raster.crs
        assert raster.transform == (30.0, 0.0, 600000.0, 0.0, -30.0, 5360000.0)

    def test_several_cubes_need_a_key(self, scenes):
        with pytest.raises(KeyAmbiguityError, match=r"2 3-D arrays \(radiance, reflectance\)"):
            read_cube(scenes / "two_cubes.mat")

    def test_key_chooses(self, scenes):
        raster = read_cube(scenes / "two_cubes.mat", key="reflectance")
        assert raster.key == "reflectance"

    def test_unknown_key_lists_what_is_there(self, scenes):
        with pytest.raises(KeyAmbiguityError, match=r"no variable `nope`.*radiance \(12, 10, 6\)"):
            read_cube(scenes / "two_cubes.mat", key="nope")

    def test_missing_file(self, tmp_path):
        with pytest.raises(SceneNotFoundError, match=r"cube file `.*missing.mat` does not exist"):
            read_cube(tmp_path / "missing.mat")

    def test_missing_file_is_a_file_not_found_error(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            read_cube(tmp_path / "missing.npy")

    @pytest.mark.parametrize("suffix", [".mat", ".npy", ".npz", ".tif"])
    def test_corrupt_file(self, tmp_path, suffix):
        path = tmp_path / f"corrupt{suffix}"
        path.write_bytes(b"this is not a hyperspectral cube" * 10)
        with pytest.raises(SceneFormatError, match=r"cannot read cube `.*corrupt"):
            read_cube(path)

    def test_unknown_suffix(self, tmp_path):
        path = tmp_path / "cube.xyz"
        path.write_bytes(b"0")
        with pytest.raises(SceneFormatError, match=r"unknown suffix `.xyz`"):
            read_cube(path)

    def test_envi_without_header(self, tmp_path):
        path = tmp_path / "lonely.img"
        path.write_bytes(b"\0" * 16)
        with pytest.raises(SceneNotFoundError, match=r"ENVI header for `.*lonely.img` not found"):
            read_cube(path)

    def test_wrong_rank(self, scenes):
        with pytest.raises(SceneFormatError, match=r"shape \(12, 10\); expected 3 dimensions"):
            read_cube(scenes / "tiny_gt.npy")


class TestReadMap:
    @pytest.mark.parametrize("name", MAP_FILES)
    def test_every_format_gives_the_same_labels(self, scenes, name):
        ref = np.load(scenes / "tiny_gt.npy")
        raster = read_map(scenes / name)
        np.testing.assert_array_equal(raster.data, ref)

    def test_multiband_tif_is_not_a_map(self, scenes):
        with pytest.raises(SceneFormatError, match=r"has 6 bands; a map must have exactly one"):
            read_map(scenes / "tiny.tif")

    def test_role_names_the_culprit(self, tmp_path):
        with pytest.raises(SceneNotFoundError, match=r"^train mask file"):
            read_map(tmp_path / "TrainImage.mat", role="train mask")

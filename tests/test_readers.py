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

    def test_envi_header_without_its_data_file(self, scenes, tmp_path):
        (tmp_path / "orphan.hdr").write_text((scenes / "tiny_bsq.hdr").read_text())
        with pytest.raises(SceneNotFoundError, match=r"`.*orphan.hdr` has no data file beside it "
                           r"\(looked for `orphan` with no ending or .img, .dat"):  # fmt: skip
            read_cube(tmp_path / "orphan.hdr")

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


def _geotiff(path, data, nodata, x0=600000, mask=None, alpha=None, sidecar=False):
    """Write ``data`` as a GeoTIFF; ``mask`` (``(H, W)`` bool, True = valid) as GDAL's internal
    per-dataset mask (a ``.msk`` file when ``sidecar``), or as a last band marked alpha when
    ``alpha`` is True."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.transform import from_origin

    bands = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    if alpha:
        bands = np.concatenate([bands, np.where(mask, 255, 0).astype(bands.dtype)[None]])
    profile = {"driver": "GTiff", "height": bands.shape[1], "width": bands.shape[2],
               "count": bands.shape[0], "dtype": bands.dtype, "nodata": nodata,
               "crs": "EPSG:32632", "transform": from_origin(x0, 5360000, 30, 30)}  # fmt: skip
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=not sidecar),
        rasterio.open(path, "w", **profile) as ds,
    ):
        if alpha:  # before the pixels, or GDAL does not keep it
            ds.colorinterp = [ColorInterp.gray] * (len(bands) - 1) + [ColorInterp.alpha]
        ds.write(bands)
        if mask is not None and not alpha:
            ds.write_mask(np.where(mask, 255, 0).astype(np.uint8))


class TestNoData:
    """The no-data value a file declares: a map reads it as unlabelled, a cube reports it."""

    def test_geotiff_label_nodata_is_unlabelled(self, tmp_path):
        labels = np.array([[1, 2, 255], [255, 2, 0]], dtype=np.uint8)
        _geotiff(tmp_path / "gt.tif", labels, nodata=255)
        with pytest.warns(match=r"gt.tif`: 2 pixels at its no-data value 255 are read as unlab"):
            found = read_map(tmp_path / "gt.tif").data
        np.testing.assert_array_equal(found, [[1, 2, 0], [0, 2, 0]])

    def test_geotiff_cube_nodata_is_reported(self, tmp_path):
        cube = np.ones((2, 3, 4), dtype=np.int16)
        _geotiff(tmp_path / "cube.tif", cube, nodata=-32768)
        raster = read_cube(tmp_path / "cube.tif")
        assert raster.nodata == -32768
        np.testing.assert_array_equal(raster.data, cube)  # the values as the file has them

    def test_envi_data_ignore_value(self, scenes, tmp_path):
        header = (scenes / "tiny_bsq.hdr").read_text() + "data ignore value = -9999\n"
        (tmp_path / "c.hdr").write_text(header)
        (tmp_path / "c.img").write_bytes((scenes / "tiny_bsq.img").read_bytes())
        assert read_cube(tmp_path / "c.hdr").nodata == -9999
        assert read_cube(scenes / "tiny_bsq.hdr").nodata is None

    def test_envi_ignore_value_must_be_a_number(self, scenes, tmp_path):
        header = (scenes / "tiny_bsq.hdr").read_text() + "data ignore value = none\n"
        (tmp_path / "c.hdr").write_text(header)
        (tmp_path / "c.img").write_bytes((scenes / "tiny_bsq.img").read_bytes())
        with pytest.raises(SceneFormatError, match=r"c.hdr.*data ignore value = none"):
            read_cube(tmp_path / "c.hdr")


class TestGeotiffMask:
    """A GeoTIFF's GDAL mask (internal, ``.msk`` or alpha band) marks no data as ``nodata``
    does."""

    @pytest.fixture
    def corner(self):
        valid = np.ones((8, 8), dtype=bool)
        valid[:2, :3] = False
        return valid

    def test_cube_mask_is_nan_and_a_file_without_one_is_unchanged(self, tmp_path, corner):
        import rasterio

        cube = np.random.default_rng(0).integers(1, 900, size=(8, 8, 4)).astype(np.int16)
        _geotiff(tmp_path / "masked.tif", cube, nodata=None, mask=corner)
        _geotiff(tmp_path / "sidecar.tif", cube, nodata=None, mask=corner, sidecar=True)
        _geotiff(tmp_path / "valid.tif", cube, nodata=None, mask=np.ones((8, 8), bool))
        _geotiff(tmp_path / "plain.tif", cube, nodata=None)
        assert (tmp_path / "sidecar.tif.msk").exists()
        for name in ("masked.tif", "sidecar.tif"):
            with rasterio.open(tmp_path / name) as ds:  # a real mask, and no nodata
                assert ds.nodata is None and (ds.read_masks(1) == 0).sum() == 6
            raster = read_cube(tmp_path / name)
            assert raster.nodata is None and raster.data.shape == (8, 8, 4)
            assert np.isnan(raster.data[~corner]).all()
            np.testing.assert_array_equal(raster.data[corner], cube[corner])
        for name in ("valid.tif", "plain.tif"):  # a mask that marks nothing, or none at all
            data = read_cube(tmp_path / name).data
            assert data.dtype == np.int16
            np.testing.assert_array_equal(data, cube)

    def test_alpha_band_is_a_mask_not_a_band(self, tmp_path, corner):
        cube = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
        _geotiff(tmp_path / "rgba.tif", cube, nodata=None, mask=corner, alpha=True)
        raster = read_cube(tmp_path / "rgba.tif")
        assert raster.data.shape == (8, 8, 3) and raster.data.dtype == np.float32
        assert np.isnan(raster.data[~corner]).all()
        np.testing.assert_array_equal(raster.data[corner], cube[corner])

    @pytest.mark.parametrize("alpha", [False, True])
    def test_map_mask_is_unlabelled_as_nodata_is(self, tmp_path, corner, alpha):
        labels = np.repeat(np.arange(1, 5), 16).reshape(8, 8).astype(np.uint8)
        _geotiff(tmp_path / "gt.tif", labels, nodata=None, mask=corner, alpha=alpha)
        _geotiff(tmp_path / "gt_nodata.tif", np.where(corner, labels, 255), nodata=255)
        with pytest.warns(match=r"gt.tif`: 6 labelled pixels its mask marks invalid are read as"):
            found = read_map(tmp_path / "gt.tif").data
        with pytest.warns(match=r"6 pixels at its no-data value 255"):
            expected = read_map(tmp_path / "gt_nodata.tif").data
        assert found.dtype == np.uint8 and (found[~corner] == 0).all()
        np.testing.assert_array_equal(found, expected)

    def test_map_with_alpha_and_two_bands_is_refused(self, tmp_path, corner):
        labels = np.ones((8, 8, 2), dtype=np.uint8)
        _geotiff(tmp_path / "gt.tif", labels, nodata=None, mask=corner, alpha=True)
        with pytest.raises(SceneFormatError, match=r"has 2 bands besides its alpha band; a map"):
            read_map(tmp_path / "gt.tif")


def test_envi_map_info_is_georeferencing(scenes, tmp_path):
    header = (scenes / "tiny_bsq.hdr").read_text() + (
        "map info = {UTM, 1.000, 1.000, 500000.000, 4200000.000, 3.0e+01, 3.0e+01, 33, North, "
        "WGS-84, units=Meters}\n"
    )
    (tmp_path / "c.hdr").write_text(header)
    (tmp_path / "c.img").write_bytes((scenes / "tiny_bsq.img").read_bytes())
    for path in (tmp_path / "c.hdr", tmp_path / "c.img"):
        raster = read_cube(path)
        assert '"WGS 84"' in raster.crs and '"central_meridian",15]' in raster.crs  # zone 33
        assert raster.transform == (30.0, 0.0, 500000.0, 0.0, -30.0, 4200000.0)
    assert read_cube(scenes / "tiny_bsq.hdr").crs is None

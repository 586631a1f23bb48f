from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import BandMismatchError, ConfigError
from pipeline.scene.render import render_rgb


@pytest.fixture
def cube() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1000, size=(20, 16, 10)).astype(np.float32)


class TestRenderRgb:
    def test_bands_mode_range_and_shape(self, cube):
        rgb, info = render_rgb(cube, mode="bands", bands=(5, 3, 1))
        assert rgb.shape == (20, 16, 3) and rgb.dtype == np.float32
        assert rgb.min() == 0.0 and rgb.max() == 1.0
        assert info.bands == (5, 3, 1)

    def test_gamma_brightens(self, cube):
        plain, _ = render_rgb(cube, mode="bands", bands=(5, 3, 1))
        bright, info = render_rgb(cube, mode="bands", bands=(5, 3, 1), gamma=0.4)
        assert bright.mean() > plain.mean()
        np.testing.assert_allclose(bright, plain**0.4, rtol=1e-5)
        assert info.gamma == 0.4

    def test_wavelengths_picks_nearest(self, cube):
        wl = np.linspace(400, 900, 10)  # 400, 455.6, 511, 566.7, 622, 677.8, ...
        _, info = render_rgb(cube, mode="wavelengths", wavelengths=wl)
        assert info.bands == (4, 3, 1)

    def test_default_mode(self, cube):
        assert render_rgb(cube)[1].mode == "pca"
        assert render_rgb(cube, wavelengths=np.arange(10) * 50 + 400.0)[1].mode == "wavelengths"

    def test_pca_deterministic(self, cube):
        a, _ = render_rgb(cube, mode="pca")
        b, _ = render_rgb(cube.copy(), mode="pca")
        np.testing.assert_array_equal(a, b)

    def test_band_out_of_range(self, cube):
        with pytest.raises(BandMismatchError, match=r"index 10 is out of range: the cube has 10"):
            render_rgb(cube, mode="bands", bands=(10, 3, 1))

    def test_wavelengths_mode_needs_wavelengths(self, cube):
        with pytest.raises(BandMismatchError, match=r"needs band wavelengths"):
            render_rgb(cube, mode="wavelengths")

    def test_bad_gamma(self, cube):
        with pytest.raises(ConfigError, match=r"`gamma` must be a finite number > 0, got 0"):
            render_rgb(cube, mode="pca", gamma=0)


class TestBoundedMemory:
    """The whole-cube statistics read blocks of rows and give numpy's whole-array bits."""

    @pytest.mark.parametrize("block", [7, 64, 10**6])
    @pytest.mark.parametrize("layout", ["rows", "bands"])  # C order; band-sequential (GeoTIFF)
    def test_column_moments_equal_numpy(self, block, layout):
        from pipeline.utils.arrays import column_moments

        rng = np.random.default_rng(3)
        for seed in range(4):
            planes = rng.standard_normal((5, 90, 110)) * 10 ** rng.uniform(0, 3) + seed * 1e3
            cube = np.moveaxis(planes.astype(np.float32), 0, -1)
            if layout == "rows":
                cube = np.ascontiguousarray(cube)
            x = cube.reshape(-1, 5)
            keep = rng.random(len(x)) > 0.2
            for kept in (None, keep):
                rows = x if kept is None else x[kept]
                wide = rows.astype(np.float64)
                mean, std = column_moments(x, kept, block=block)
                assert np.array_equal(mean, wide.mean(axis=0))
                assert np.array_equal(std, wide.std(axis=0))
                mean, std = column_moments(x, kept, block=block, cast_first=False)
                assert np.array_equal(mean, rows.mean(axis=0, dtype=np.float64))
                assert np.array_equal(std, rows.std(axis=0, dtype=np.float64))

    def test_pca_rendering_in_blocks_equals_one_block(self, cube, monkeypatch):
        import pipeline.scene.render as render
        import pipeline.utils.arrays as arrays

        holes = np.zeros(cube.shape[:2], dtype=bool)
        holes[2:5, 3:9] = True
        whole = [render_rgb(cube, mode="pca", valid=v)[0] for v in (None, ~holes)]
        monkeypatch.setattr(render, "BLOCK_ROWS", 11)  # 320 rows in 30 blocks
        monkeypatch.setattr(arrays, "BLOCK_ROWS", 11)
        blocks = [render_rgb(cube, mode="pca", valid=v)[0] for v in (None, ~holes)]
        for a, b in zip(whole, blocks, strict=True):
            assert np.array_equal(a, b)

    def test_fingerprint_of_a_band_sequential_cube_hashes_its_c_order_bytes(self, monkeypatch):
        import hashlib

        import pipeline.io.store as store

        planes = np.random.default_rng(5).standard_normal((4, 30, 20)).astype(np.float32)
        cube = np.moveaxis(planes, 0, -1)  # a GeoTIFF's layout: no C-order bytes to hash
        copy = np.ascontiguousarray(cube)
        expected = hashlib.sha256(f"{copy.dtype.str}{copy.shape}".encode() + copy.tobytes())
        blocks = store._c_order_blocks
        monkeypatch.setattr(store, "_c_order_blocks", lambda a: blocks(a, size=1000))
        assert store.sha256_arrays(cube) == store.sha256_arrays(copy) == expected.hexdigest()

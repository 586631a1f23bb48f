from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.scene.synthetic import make_synthetic_scene


class TestSyntheticScene:
    def test_deterministic(self):
        a, b = make_synthetic_scene(seed=5), make_synthetic_scene(seed=5)
        np.testing.assert_array_equal(a.cube, b.cube)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert not np.array_equal(a.cube, make_synthetic_scene(seed=6).cube)

    def test_classes_and_regions(self):
        scene = make_synthetic_scene(n_classes=8, seed=0)
        ids = np.unique(scene.labels[scene.labels > 0])
        np.testing.assert_array_equal(ids, np.arange(1, 9))
        # spatially coherent: few connected components per class compared to its pixel count
        for c in ids:
            _, n = ndimage.label(scene.labels == c)
            assert n < (scene.labels == c).sum() / 50

    def test_twins_are_spectral_twins_with_different_texture(self):
        scene = make_synthetic_scene(seed=0)
        smooth, striped = scene.texture_classes
        a = scene.cube[scene.labels == smooth]
        b = scene.cube[scene.labels == striped]
        # mean spectra nearly identical relative to the within-class spread ...
        gap = np.abs(a.mean(0) - b.mean(0)).max()
        assert gap < 0.05 * b.std(0).mean() + 0.01

        # ... but the striped class has far more local (high-frequency) variation
        def local_var(cls: int) -> float:
            band = scene.cube[..., 0]
            lap = np.abs(ndimage.laplace(band))
            inner = ndimage.binary_erosion(scene.labels == cls, iterations=2)
            return float(lap[inner].mean())

        assert local_var(striped) > 5 * local_var(smooth)

    def test_renders_on_a_real_geometry(self):
        geometry = np.zeros((30, 40), dtype=np.int64)
        geometry[2:10, 2:10] = 4
        geometry[15:25, 5:30] = 9
        geometry[5:12, 20:35] = 12
        scene = make_synthetic_scene(label_map=geometry, n_bands=16, seed=0)
        assert scene.cube.shape == (30, 40, 16)
        np.testing.assert_array_equal(scene.labels, geometry)
        assert scene.texture_classes == (9, 12)

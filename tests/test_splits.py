from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import LabelError, SplitError
from pipeline.scene.readers import read_map
from pipeline.scene.splits import encode_labels, make_split


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((40, 40), dtype=np.int64)
    ids[:20, :20] = 3
    ids[:20, 20:] = 7
    ids[20:, :] = 9
    ids[20:22, :5] = 0
    return encode_labels(ids)


class TestEncodeLabels:
    def test_non_contiguous_ids_become_indices(self):
        index, ids = encode_labels(np.array([[0, 1, 10], [11, 14, 0]]))
        np.testing.assert_array_equal(ids, [1, 10, 11, 14])
        np.testing.assert_array_equal(index, [[-1, 0, 1], [2, 3, -1]])

    def test_integer_valued_floats_are_accepted(self):
        _, ids = encode_labels(np.array([[0.0, 2.0], [5.0, 2.0]], dtype=np.float32))
        np.testing.assert_array_equal(ids, [2, 5])

    def test_non_integer(self):
        with pytest.raises(LabelError, match=r"1 non-integer values \(e.g. 2.5\)"):
            encode_labels(np.array([[0.0, 2.5]]), source="labels.npy")

    def test_negative(self):
        with pytest.raises(LabelError, match=r"1 negative value \(min -3\)"):
            encode_labels(np.array([[0, -3], [1, 2]]))

    def test_nan(self):
        with pytest.raises(LabelError, match=r"1 NaN/inf"):
            encode_labels(np.array([[0.0, np.nan]]))

    def test_all_unlabeled(self):
        with pytest.raises(LabelError, match=r"no labeled pixel"):
            encode_labels(np.zeros((3, 3), dtype=int))


class TestPerClassSplit:
    def test_counts_and_disjoint(self):
        labels, ids = _blobs()
        train, test = make_split("per-class", labels, ids, per_class=5, seed=1)
        assert not (train & test).any()
        np.testing.assert_array_equal(np.bincount(labels[train]), [5, 5, 5])
        assert (train | test).sum() == (labels >= 0).sum()

    def test_deterministic_per_seed(self):
        labels, ids = _blobs()
        a = make_split("per-class", labels, ids, per_class=5, seed=3)
        b = make_split("per-class", labels, ids, per_class=5, seed=3)
        c = make_split("per-class", labels, ids, per_class=5, seed=4)
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.array_equal(a[0], c[0])

    def test_too_few_pixels_names_the_class(self):
        labels, ids = encode_labels(np.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 2]]))
        with pytest.raises(SplitError, match=r"class 1 has only 3 labeled pixels, fewer than"):
            make_split("per-class", labels, ids, per_class=5)

    def test_take_all_small_classes(self):
        labels, ids = encode_labels(np.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 2]]))
        train, test = make_split("per-class", labels, ids, per_class=5, small_classes="take-all")
        assert train[0, :3].all() and not test[0, :3].any()
        assert train[0, 3:].sum() == 5

    def test_real_indian_pines_geometry(self, shared_data):
        gt = read_map(shared_data / "gt_maps" / "Indian_pines_gt.mat").data
        labels, ids = encode_labels(gt)
        assert len(ids) == 16 and (labels >= 0).sum() == 10249
        train, test = make_split("per-class", labels, ids, per_class=5, seed=0)
        assert train.sum() == 80 and test.sum() == 10249 - 80
        assert not (train & test).any()


class TestFractionSplit:
    def test_at_least_one_per_class(self):
        labels, ids = _blobs()
        train, _ = make_split("fraction", labels, ids, fraction=0.01, seed=0)
        assert (np.bincount(labels[train]) >= 1).all()

    def test_fraction_out_of_range(self):
        labels, ids = _blobs()
        with pytest.raises(SplitError, match=r"`fraction` must be in \(0, 1\), got 1.5"):
            make_split("fraction", labels, ids, fraction=1.5)


class TestBlocksSplit:
    def test_train_and_test_in_different_blocks(self):
        labels, ids = _blobs()
        train, test = make_split("blocks", labels, ids, per_class=5, block_size=10, seed=2)
        block = (np.arange(40)[:, None] // 10) * 4 + np.arange(40)[None, :] // 10
        assert not set(block[train]) & set(block[test])
        np.testing.assert_array_equal(np.bincount(labels[train]), [5, 5, 5])

    def test_buffer_keeps_test_away_from_train_blocks(self):
        labels, ids = _blobs()
        train, test = make_split(
            "blocks", labels, ids, per_class=5, block_size=10, buffer=4, seed=2
        )
        from scipy import ndimage

        dist = ndimage.distance_transform_cdt(~train, metric="chessboard")
        assert dist[test].min() > 4

    def test_real_salinas_geometry(self, shared_data):
        gt = read_map(shared_data / "gt_maps" / "Salinas_gt.mat").data
        labels, ids = encode_labels(gt)
        train, test = make_split("blocks", labels, ids, per_class=10, block_size=32, seed=0)
        assert not (train & test).any()
        assert (np.bincount(labels[train], minlength=16) == 10).all()


class TestOfficialSplit:
    def test_overlap_is_refused(self):
        labels, ids = _blobs()
        a = labels >= 0
        with pytest.raises(
            SplitError, match=r"overlap in 1590 pixels \(first at row 0, column 0\)"
        ):
            make_split("official", labels, ids, train_mask=a, test_mask=a)

    def test_empty_train(self):
        labels, ids = _blobs()
        with pytest.raises(SplitError, match=r"train set is empty"):
            make_split(
                "official", labels, ids, train_mask=np.zeros_like(labels), test_mask=labels >= 0
            )

    def test_unknown_protocol(self):
        labels, ids = _blobs()
        with pytest.raises(SplitError, match=r"unknown `split=random`"):
            make_split("random", labels, ids)

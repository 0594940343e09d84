"""Datasets on disk: each format reads back its array, batches cover each sample once, errors say why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_export import data as data_module
from bn_export.data import describe_nonfinite, load_targets, open_dataset
from bn_export.errors import DataError


def _write_csv(path: Path, array: np.ndarray, header: bool) -> None:
    lines = [",".join(f"c{i}" for i in range(array.shape[1]))] if header else []
    lines += [",".join(repr(float(v)) for v in row) for row in array]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def array() -> np.ndarray:
    return np.random.default_rng(0).normal(3.0, 2.0, size=(37, 3, 4)).astype(np.float32)


def test_npy_is_memory_mapped_and_reads_back(tmp_path: Path, array: np.ndarray) -> None:
    np.save(tmp_path / "x.npy", array)
    dataset = open_dataset(tmp_path / "x.npy")
    assert (dataset.num_samples, dataset.sample_shape, dataset.dtype) == (37, (3, 4), np.float32)
    view = dataset.read(5, 9)
    assert isinstance(view, np.memmap)
    np.testing.assert_array_equal(view, array[5:9])


def test_npz_uses_data_then_only_array_then_key(tmp_path: Path, array: np.ndarray) -> None:
    np.savez(tmp_path / "a.npz", data=array, other=array[:2])
    np.savez(tmp_path / "b.npz", anything=array)
    np.testing.assert_array_equal(open_dataset(tmp_path / "a.npz").read(0, 37), array)
    np.testing.assert_array_equal(open_dataset(tmp_path / "b.npz").read(0, 37), array)
    assert open_dataset(f"{tmp_path / 'a.npz'}:other").num_samples == 2


def test_npz_without_data_and_several_arrays_asks_for_a_key(tmp_path: Path, array: np.ndarray) -> None:
    np.savez(tmp_path / "c.npz", one=array, two=array)
    with pytest.raises(DataError, match="pick one"):
        open_dataset(tmp_path / "c.npz")
    with pytest.raises(DataError, match="no array 'three'"):
        open_dataset(f"{tmp_path / 'c.npz'}:three")


@pytest.mark.parametrize("header", [True, False])
def test_csv_skips_a_header_and_reads_across_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: bool
) -> None:
    monkeypatch.setattr(data_module, "CSV_BLOCK_ROWS", 8)  # several blocks from a small file
    values = np.random.default_rng(1).normal(size=(45, 5))
    _write_csv(tmp_path / "x.csv", values, header)
    dataset = open_dataset(tmp_path / "x.csv")
    assert dataset.shape == (45, 5)
    np.testing.assert_array_equal(dataset.read(0, 45), values)
    np.testing.assert_array_equal(dataset.read(6, 19), values[6:19])


def test_shard_directory_reads_as_one_array_in_name_order(tmp_path: Path, array: np.ndarray) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, part in zip(["b.npy", "a.npy", "c.npy"], np.split(array, [10, 30]), strict=True):
        np.save(shards / name, part)  # 'a' holds the middle part: name order, not write order
    dataset = open_dataset(shards)
    expected = np.concatenate([array[10:30], array[:10], array[30:]])
    np.testing.assert_array_equal(dataset.read(0, 37), expected)
    np.testing.assert_array_equal(dataset.read(15, 33), expected[15:33])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), batch_size=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_batches_cover_every_sample_exactly_once(n: int, batch_size: int, seed: int) -> None:
    dataset = data_module.Dataset(Path("mem"), [data_module._ArraySource(np.arange(n * 2.0).reshape(n, 2))])
    for shuffle in (False, True):
        batches = list(dataset.batches(batch_size, shuffle=shuffle, seed=seed))
        seen = np.concatenate([b.indices for b in batches])
        assert sorted(seen.tolist()) == list(range(n))
        assert all(len(b.indices) <= batch_size for b in batches)
        for batch in batches:  # each batch's rows are the samples it names
            np.testing.assert_array_equal(batch.data[:, 0], batch.indices * 2.0)


def test_block_shuffle_is_seeded_and_mixes_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "SHUFFLE_BLOCK_BYTES", 64 * 8)  # 64 samples of 8 bytes per block
    np.save(tmp_path / "x.npy", np.arange(1000.0).reshape(1000, 1))
    dataset = open_dataset(tmp_path / "x.npy")

    def order(seed: int, epoch: int) -> list[int]:
        batches = dataset.batches(16, shuffle=True, seed=seed, epoch=epoch)
        return np.concatenate([b.indices for b in batches]).tolist()

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(4, 0)
    assert order(3, 0) != order(3, 1)
    first = order(3, 0)[:64]  # one block read whole: 64 samples from one contiguous range, permuted
    assert max(first) - min(first) == 63
    assert first != sorted(first)


@pytest.mark.parametrize(("batch_size", "block_samples"), [(16, 64), (64, 64), (50, 64)])
def test_storage_order_keeps_the_shuffled_batches_and_views_whole_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int, block_samples: int
) -> None:
    monkeypatch.setattr(data_module, "SHUFFLE_BLOCK_BYTES", block_samples * 8)
    np.save(tmp_path / "x.npy", np.arange(1000.0).reshape(1000, 1))
    dataset = open_dataset(tmp_path / "x.npy")
    shuffled = list(dataset.batches(batch_size, shuffle=True, seed=7, epoch=2))
    ordered = list(dataset.batches(batch_size, shuffle=True, seed=7, epoch=2, storage_order=True))
    assert [b.number for b in ordered] == [b.number for b in shuffled]
    whole_block = batch_size >= block_samples
    for plain, sorted_batch in zip(shuffled, ordered, strict=True):
        np.testing.assert_array_equal(sorted_batch.indices, np.sort(plain.indices))
        np.testing.assert_array_equal(sorted_batch.data[:, 0], sorted_batch.indices * 1.0)
        contiguous = int(np.ptp(sorted_batch.indices)) + 1 == len(sorted_batch.indices)
        # A batch that is a whole block (or any contiguous run) is read in place, not gathered.
        assert np.shares_memory(sorted_batch.data, dataset.read(0, 1000)) == contiguous
        if whole_block:
            assert contiguous


def test_prefetched_batches_are_the_same_batches_in_the_same_order(tmp_path: Path) -> None:
    values = np.random.default_rng(1).normal(size=(300, 2, 700)).astype(np.float32)
    np.save(tmp_path / "x.npy", values)
    dataset = open_dataset(tmp_path / "x.npy")
    plain = list(dataset.batches(32, shuffle=True, seed=3))
    ahead = list(data_module.prefetched(dataset.batches(32, shuffle=True, seed=3)))
    assert len(ahead) == len(plain)
    for a, b in zip(ahead, plain, strict=True):
        assert a.number == b.number
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.data, b.data)


def test_prefetched_reads_nan_inf_and_huge_values_without_warning() -> None:
    values = np.full((4, 2, 600), 6e4, dtype=np.float16)  # sums would overflow float16
    values[1, 0, :2] = [np.inf, -np.inf]
    values[2, 1, 5] = np.nan
    dataset = data_module.Dataset(Path("mem"), [data_module._ArraySource(values)])
    batches = list(data_module.prefetched(dataset.batches(2)))  # warnings are errors under pytest
    np.testing.assert_array_equal(np.concatenate([b.data for b in batches]), values)


def test_prefetched_passes_on_a_reading_error(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("1,2\n3,4\n5,x\n")
    dataset = open_dataset(tmp_path / "x.csv")
    with pytest.raises(DataError, match="not numeric"):
        list(data_module.prefetched(dataset.batches(1)))


def test_fingerprint_covers_content_shape_and_dtype_not_format(tmp_path: Path, array: np.ndarray) -> None:
    np.save(tmp_path / "x.npy", array)
    np.savez(tmp_path / "x.npz", data=array)
    changed = array.copy()
    changed[20, 1, 2] += 1
    np.save(tmp_path / "y.npy", changed)
    np.save(tmp_path / "z.npy", array.reshape(37, 12))
    np.save(tmp_path / "w.npy", array.astype(np.float64))
    prints = {
        name: open_dataset(tmp_path / name).fingerprint()
        for name in ["x.npy", "x.npz", "y.npy", "z.npy", "w.npy"]
    }
    assert prints["x.npy"] == prints["x.npz"]
    assert len({prints[k] for k in ["x.npy", "y.npy", "z.npy", "w.npy"]}) == 4


def test_fingerprint_of_large_data_samples_fixed_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_module, "FINGERPRINT_FULL_BYTES", 1024)
    monkeypatch.setattr(data_module, "FINGERPRINT_BLOCK_BYTES", 80)  # 10 samples of 8 bytes
    monkeypatch.setattr(data_module, "FINGERPRINT_BLOCKS", 4)  # at samples 0, 330, 660, 990
    values = np.zeros((1000, 1))
    np.save(tmp_path / "x.npy", values)
    base = open_dataset(tmp_path / "x.npy").fingerprint()
    values[335] = 1.0  # inside a hashed block
    np.save(tmp_path / "x.npy", values)
    assert open_dataset(tmp_path / "x.npy").fingerprint() != base
    values[335] = 0.0
    values[500] = 1.0  # between blocks: documented as not covered
    np.save(tmp_path / "x.npy", values)
    assert open_dataset(tmp_path / "x.npy").fingerprint() == base


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing.npy", "no such file"),
        (lambda p: (p / "x.txt").write_text("1,2") and p / "x.txt", "unsupported file type"),
        (lambda p: np.save(p / "e.npy", np.zeros((0, 3))) or p / "e.npy", "empty"),
        (
            lambda p: np.save(p / "s.npy", np.array([["a", "b"]])) or p / "s.npy",
            "expected integer or floating",
        ),
        (
            lambda p: np.save(p / "c.npy", np.ones((3, 2), complex)) or p / "c.npy",
            "expected integer or floating",
        ),
        (lambda p: np.save(p / "r1.npy", np.ones(3)) or p / "r1.npy", "rank 1"),
        (lambda p: np.save(p / "r6.npy", np.ones((2,) * 6)) or p / "r6.npy", "rank 6"),
        (lambda p: (p / "h.csv").write_text("a,b\n") and p / "h.csv", "no data rows"),
        (lambda p: (p / "t.csv").write_text("a,b\n1,2\nx,3\n") and p / "t.csv", "not numeric"),
        (lambda p: (p / "d").mkdir() or p / "d", "no .npy shards"),
    ],
)
def test_bad_data_raises_data_error_saying_what_is_wrong(tmp_path: Path, setup: object, message: str) -> None:
    path = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(DataError, match=message):
        open_dataset(path).read(0, 2)


def test_object_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a numeric"):
        open_dataset(tmp_path / "o.npy")


def test_mismatched_shard_is_named(tmp_path: Path) -> None:
    np.save(tmp_path / "0.npy", np.ones((4, 3), np.float32))
    np.save(tmp_path / "1.npy", np.ones((4, 5), np.float32))
    with pytest.raises(DataError, match=r"1\.npy.*shards must match"):
        open_dataset(tmp_path)
    np.save(tmp_path / "1.npy", np.ones((4, 3), np.float64))
    with pytest.raises(DataError, match=r"1\.npy.*float64"):
        open_dataset(tmp_path)


def test_targets_in_every_format_and_length_checked(tmp_path: Path) -> None:
    labels = np.arange(6) % 3
    np.save(tmp_path / "t.npy", labels)
    np.savez(tmp_path / "t.npz", data=np.zeros((6, 2)), targets=labels)
    (tmp_path / "t.csv").write_text("label\n" + "\n".join(map(str, labels)) + "\n")
    for spec in ["t.npy", "t.npz", "t.csv"]:
        np.testing.assert_array_equal(load_targets(tmp_path / spec, 6), labels)
    with pytest.raises(DataError, match="6 targets for 7 data samples"):
        load_targets(tmp_path / "t.npy", 7)


def test_nonfinite_sample_is_named() -> None:
    values = np.zeros((8, 2))
    values[5, 1] = np.nan
    dataset = data_module.Dataset(Path("mem"), [data_module._ArraySource(values)])
    batch = list(dataset.batches(4))[1]
    assert describe_nonfinite(batch, "x.npy") == "x.npy: sample 5 in batch 1 (samples 4..7) holds NaN or Inf"


@settings(max_examples=40, deadline=None)
@given(
    num_samples=st.integers(1, 300),
    batch_size=st.integers(1, 70),
    block_samples=st.integers(1, 120),
    group_samples=st.integers(1, 150),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
)
def test_batch_groups_hand_out_the_batches_of_storage_order_batches(
    num_samples: int,
    batch_size: int,
    block_samples: int,
    group_samples: int,
    shuffle: bool,
    seed: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Sample size 16 bytes: the block and group sizes below are in samples.
    path = tmp_path_factory.mktemp("groups") / "x.npy"
    np.save(path, np.arange(num_samples * 4, dtype=np.float32).reshape(num_samples, 4))
    dataset = open_dataset(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "SHUFFLE_BLOCK_BYTES", block_samples * 16)
        patch.setattr(data_module, "GROUP_BYTES", group_samples * 16)
        expected = list(dataset.batches(batch_size, shuffle=shuffle, seed=seed, epoch=1, storage_order=True))
        groups = list(dataset.batch_groups(batch_size, shuffle=shuffle, seed=seed, epoch=1))
    batches = [batch for group in groups for batch in group.batches]
    assert [b.number for b in batches] == [b.number for b in expected]
    for got, want in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
    for group in groups:  # each group's batches lie one after another in its data
        np.testing.assert_array_equal(np.concatenate([b.data for b in group.batches]), group.data)


def test_a_truncated_npy_is_named_as_truncated(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((100, 8), dtype=np.float32))
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match=r"x\.npy: truncated \.npy file"):
        open_dataset(tmp_path / "x.npy")

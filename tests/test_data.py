"""Tests for fastvae.data: embedded MNIST, IDX reader, load_data, range checks, splits, device batching."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import shutil
import struct

import numpy as np
import pytest
import torch

from fastvae import data
from fastvae.data import (
    DeviceBatches,
    check_unit_range,
    iterate_batches,
    load_data,
    load_mnist,
    read_idx,
    split_train_val,
    to_device,
)

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(path, array: np.ndarray, *, compress: bool = False, type_code: int | None = None) -> None:
    """Write an IDX file by hand (the format spec, independently of fastvae.data)."""
    codes = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}
    code = codes[array.dtype.name] if type_code is None else type_code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


# --------------------------------------------------------------------------------------------
# Embedded MNIST
# --------------------------------------------------------------------------------------------


def test_load_mnist_all_shapes_dtypes_and_label_counts():
    x, y = load_mnist()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
    assert int(x.max()) == 255 and int(x.min()) == 0
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known start of t10k


def test_load_mnist_splits_are_first_9000_and_last_1000():
    x_all, y_all = load_mnist("all")
    x_tr, y_tr = load_mnist("train")
    x_te, y_te = load_mnist("test")
    assert x_tr.shape[0] == 9_000 and x_te.shape[0] == 1_000
    assert torch.equal(torch.cat([x_tr, x_te]), x_all)
    assert torch.equal(torch.cat([y_tr, y_te]), y_all)
    assert (torch.bincount(y_tr, minlength=10) + torch.bincount(y_te, minlength=10)).tolist() == (
        MNIST_TEST_LABEL_COUNTS
    )
    # every digit is represented in the held-out part
    assert torch.bincount(y_te, minlength=10).min() > 50


def test_load_mnist_unknown_split():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test', 'all'\), got 'val'"):
        load_mnist("val")


def test_load_mnist_is_cached_and_returns_independent_tensors():
    x1, y1 = load_mnist("test")
    before = data._mnist_arrays.cache_info().hits
    x1.zero_()
    y1.fill_(-1)
    x2, y2 = load_mnist("test")
    assert data._mnist_arrays.cache_info().hits == before + 1
    assert int(x2.max()) == 255 and int(y2.min()) == 0


def test_load_mnist_md5_mismatch_names_the_file(tmp_path, monkeypatch):
    src = importlib.resources.files("fastvae.assets") / "mnist"
    fake = tmp_path / "assets"
    (fake / "mnist").mkdir(parents=True)
    for name in ("MD5SUMS", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(str(src / name), fake / "mnist" / name)
        (fake / "mnist" / name).chmod(0o644)
    labels = fake / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[-20] ^= 0xFF
    labels.write_bytes(bytes(raw))

    real_files = importlib.resources.files
    monkeypatch.setattr(
        importlib.resources, "files", lambda pkg: fake if pkg == "fastvae.assets" else real_files(pkg)
    )
    data._mnist_arrays.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"t10k-labels-idx1-ubyte\.gz: MD5 mismatch"):
            load_mnist()
    finally:
        monkeypatch.undo()
        data._mnist_arrays.cache_clear()
    assert load_mnist("test")[0].shape == (1_000, 1, 28, 28)


def test_embedded_md5sums_match():
    folder = importlib.resources.files("fastvae.assets") / "mnist"
    for line in (folder / "MD5SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == digest


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(5, 3, 4)) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress=compress)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert np.array_equal(out, array)
    out[0] = 0  # writable


def test_read_idx_gzip_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # no .gz suffix, but gzip content
    write_idx(path, array, compress=True)
    assert np.array_equal(read_idx(path), array)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated_file_names_the_file(tmp_path, compress):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    good = tmp_path / "good"
    write_idx(good, array)
    payload = good.read_bytes()[:-100]
    path = tmp_path / ("trunc-images-idx3-ubyte.gz" if compress else "trunc-images-idx3-ubyte")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(ValueError, match=r"trunc-images-idx3-ubyte.*truncated IDX file") as info:
        read_idx(path)
    assert "(2, 28, 28)" in str(info.value)


def test_read_idx_truncated_gzip_stream_names_the_file(tmp_path):
    path = tmp_path / "cut.gz"
    write_idx(path, np.zeros((50, 28, 28), np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_read_idx_bad_magic_and_trailing_bytes(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match=r"bad\.idx: bad IDX magic number 0x12340801"):
        read_idx(bad)
    bad_type = tmp_path / "badtype.idx"
    write_idx(bad_type, np.zeros(3, np.uint8), type_code=0x07)
    with pytest.raises(ValueError, match=r"badtype\.idx: bad IDX magic"):
        read_idx(bad_type)
    padded = tmp_path / "padded.idx"
    write_idx(padded, np.zeros(3, np.uint8))
    padded.write_bytes(padded.read_bytes() + b"\x00\x00")
    with pytest.raises(ValueError, match=r"padded\.idx: IDX file has 2 unexpected trailing bytes"):
        read_idx(padded)
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        read_idx(tmp_path / "missing.idx")


# --------------------------------------------------------------------------------------------
# load_data
# --------------------------------------------------------------------------------------------


def _torchvision_raw(tmp_path, compress: bool):
    """A torchvision-style MNIST/raw folder with train and t10k files."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sfx = ".gz" if compress else ""
    files = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{sfx}", images, compress=compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{sfx}", labels, compress=compress)
        files[prefix] = (images, labels)
    return raw, files


@pytest.mark.parametrize("compress", [False, True])
def test_load_data_idx_file_with_sibling_labels(tmp_path, compress):
    raw, files = _torchvision_raw(tmp_path, compress)
    sfx = ".gz" if compress else ""
    x, y = load_data(raw / f"t10k-images-idx3-ubyte{sfx}")
    images, labels = files["t10k"]
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), images)
    assert y is not None and y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_load_data_directory_prefers_train(tmp_path):
    raw, files = _torchvision_raw(tmp_path, compress=True)
    for root in (raw, tmp_path, str(tmp_path / "MNIST")):
        x, y = load_data(root)
        assert x.shape == (12, 1, 28, 28)
        assert y is not None and y.tolist() == files["train"][1].tolist()
    for f in raw.glob("train-*"):
        f.unlink()
    x, y = load_data(tmp_path)
    assert x.shape == (5, 1, 28, 28) and y is not None and y.shape == (5,)


def test_load_data_directory_without_idx(tmp_path):
    with pytest.raises(FileNotFoundError, match="no IDX images file"):
        load_data(tmp_path)


def test_load_data_idx_without_labels_and_explicit_labels(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    write_idx(tmp_path / "my-images-idx3-ubyte", images)
    x, y = load_data(tmp_path / "my-images-idx3-ubyte")
    assert x.shape == (4, 1, 28, 28) and y is None
    x, y = load_data(tmp_path / "my-images-idx3-ubyte", labels=np.array([1, 2, 3, 4]))
    assert y is not None and y.tolist() == [1, 2, 3, 4]
    write_idx(tmp_path / "lab.idx", np.array([4, 3, 2, 1], np.uint8))
    _, y = load_data(tmp_path / "my-images-idx3-ubyte", labels=tmp_path / "lab.idx")
    assert y is not None and y.tolist() == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="labels has 3 entries but the images have 4 samples"):
        load_data(tmp_path / "my-images-idx3-ubyte", labels=np.array([1, 2, 3]))


def test_load_data_mnist():
    x, y = load_data("mnist")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8
    assert y is not None and torch.bincount(y).tolist() == MNIST_TEST_LABEL_COUNTS


def test_load_data_npy_npz_pt(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.random((6, 8, 8), dtype=np.float32)
    labels = np.arange(6)

    np.save(tmp_path / "x.npy", images)
    x, y = load_data(tmp_path / "x.npy")
    assert x.shape == (6, 1, 8, 8) and x.dtype == torch.float32 and y is None
    assert np.allclose(x[:, 0].numpy(), images)

    for xk, yk in (("x", "y"), ("images", "labels"), ("arr_0", "arr_1")):
        np.savez(tmp_path / "d.npz", **{xk: images, yk: labels})
        x, y = load_data(tmp_path / "d.npz")
        assert x.shape == (6, 1, 8, 8) and y is not None and y.tolist() == labels.tolist()
    np.savez(tmp_path / "only.npz", images=(images * 255).astype(np.uint8))
    x, y = load_data(tmp_path / "only.npz")
    assert x.dtype == torch.uint8 and y is None
    np.savez(tmp_path / "wrong.npz", foo=images)
    with pytest.raises(KeyError, match=r"no images array.*'foo'"):
        load_data(tmp_path / "wrong.npz")

    t = torch.from_numpy(images)
    torch.save(t, tmp_path / "t.pt")
    x, y = load_data(tmp_path / "t.pt")
    assert torch.equal(x[:, 0], t) and y is None
    torch.save({"images": t, "labels": torch.from_numpy(labels)}, tmp_path / "d.pt")
    x, y = load_data(tmp_path / "d.pt")
    assert y is not None and y.tolist() == labels.tolist()
    torch.save((t, torch.from_numpy(labels)), tmp_path / "tuple.pt")
    x, y = load_data(tmp_path / "tuple.pt")
    assert x.shape == (6, 1, 8, 8) and y is not None and y.shape == (6,)


def test_load_data_tensors_and_arrays_shapes():
    u8 = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    x, y = load_data(u8)
    assert torch.equal(x, u8) and y is None
    x, _ = load_data(np.zeros((5, 4, 4), np.uint8))
    assert x.shape == (5, 1, 4, 4)
    x, _ = load_data(np.full((5, 10), 0.5))  # flat features stay flat; float64 -> float32
    assert x.shape == (5, 10) and x.dtype == torch.float32
    x, _ = load_data(np.zeros((5, 32, 32, 3), np.uint8))  # channels-last -> channels-first
    assert x.shape == (5, 3, 32, 32)
    x, _ = load_data(torch.ones(5, 4, 4, dtype=torch.bool))
    assert x.dtype == torch.float32


def test_load_data_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data("/nonexistent/path/x.npy")


# --------------------------------------------------------------------------------------------
# range checks
# --------------------------------------------------------------------------------------------


def test_normalized_data_refused_with_hint():
    x, _ = load_mnist("test")
    normalized = (x.float() / 255 - 0.1307) / 0.3081
    with pytest.raises(ValueError) as info:
        load_data(normalized)
    msg = str(info.value)
    assert "min=-0.424" in msg and "max=2.82" in msg
    assert "BCE needs targets in [0, 1]" in msg
    assert "Normalize((0.1307,), (0.3081,))" in msg and "x / 255" in msg and "min-max" in msg


def test_raw_pixel_floats_refused_with_hint():
    with pytest.raises(ValueError, match=r"min=0, max=255.*raw pixel values.*divide by 255"):
        load_data(torch.arange(256, dtype=torch.float32).reshape(1, 16, 16))


def test_nan_and_inf_refused():
    x = torch.rand(4, 1, 8, 8)
    x[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(NaN or inf\)"):
        load_data(x)
    x[1, 0, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        check_unit_range(x, "images")


def test_empty_and_bad_dtypes_refused():
    with pytest.raises(ValueError, match="empty"):
        load_data(torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match="empty"):
        load_data(np.zeros((3, 0), np.float32))
    with pytest.raises(TypeError, match=r"dtype torch\.int32; expected uint8 pixels"):
        load_data(torch.zeros(2, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="expected uint8"):
        check_unit_range(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"\(7,\) \(1-D\)"):
        load_data(np.zeros(7, np.float32))
    with pytest.raises(TypeError, match="source must be"):
        load_data(3.0)  # type: ignore[arg-type]


def test_check_unit_range_accepts_valid_data_and_can_be_disabled():
    check_unit_range(torch.rand(10))
    check_unit_range(np.array([0.0, 1.0]))
    check_unit_range(torch.full((3,), 200, dtype=torch.uint8))
    x, _ = load_data(torch.randn(4, 10), check_range=False)
    assert x.min() < 0
    with pytest.raises(ValueError, match=r"^images must lie in \[0, 1\]"):
        check_unit_range(torch.tensor([-0.1, 0.5]), "images")


# --------------------------------------------------------------------------------------------
# splitting and batching
# --------------------------------------------------------------------------------------------


def test_split_train_val_matches_fixed_mnist_split():
    x, y = load_mnist("all")
    x_tr, y_tr, x_va, y_va = split_train_val(x, y, 0.1)
    assert torch.equal(x_tr, load_mnist("train")[0]) and torch.equal(y_va, load_mnist("test")[1])
    assert y_tr is not None and y_tr.shape == (9_000,) and x_va.shape == (1_000, 1, 28, 28)


def test_split_train_val_edge_cases():
    x = torch.arange(10).reshape(10, 1).float() / 10
    x_tr, y_tr, x_va, y_va = split_train_val(x, None, 0.25)
    assert x_tr.shape[0] == 8 and x_va.shape[0] == 2 and y_tr is None and y_va is None
    assert torch.equal(x_va[:, 0], torch.tensor([0.8, 0.9]))
    x_tr, _, x_va, _ = split_train_val(x, None, 0.0)
    assert x_tr.shape[0] == 10 and x_va.shape[0] == 0
    _, _, x_va, _ = split_train_val(x, None, 0.01)
    assert x_va.shape[0] == 1
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\), got 1.0"):
        split_train_val(x, None, 1.0)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        split_train_val(x, torch.zeros(3), 0.1)


def test_to_device_keeps_dtype():
    x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    out = to_device((x, None, {"y": torch.zeros(3, dtype=torch.int64)}), "cpu")
    assert out[0].dtype == torch.uint8 and out[1] is None and out[2]["y"].dtype == torch.int64


def _indexed(n: int):
    """Images whose content encodes their index, so batches can be traced back."""
    idx = torch.arange(n)
    images = torch.stack([idx % 256, idx // 256], 1).to(torch.uint8).reshape(n, 1, 1, 2)
    return images, idx


def _decode(images: torch.Tensor) -> torch.Tensor:
    flat = images.reshape(images.shape[0], 2).long()
    return flat[:, 0] + 256 * flat[:, 1]


@pytest.mark.parametrize("n,batch", [(1000, 128), (64, 64), (10, 3), (5, 100)])
def test_batches_cover_every_index_once(n, batch):
    images, labels = _indexed(n)
    seen = []
    for xb, yb in iterate_batches(images, labels, batch, generator=torch.Generator().manual_seed(0)):
        assert xb.dtype == torch.uint8 and xb.shape[1:] == (1, 1, 2) and xb.shape[0] <= batch
        assert torch.equal(_decode(xb), yb)
        seen.append(yb)
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(n))
    assert len(seen) == -(-n // batch)
    if n > batch:
        assert order.tolist() != list(range(n))  # shuffled


def test_batches_drop_last_and_no_shuffle():
    images, labels = _indexed(10)
    batches = list(iterate_batches(images, labels, 3, drop_last=True, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert batches[0][0].data_ptr() == images.data_ptr()  # unshuffled batches are views
    xb, yb = next(iter(iterate_batches(images, None, 4, shuffle=False)))
    assert yb is None and xb.shape[0] == 4


def test_batches_reproducible_with_seeded_generator():
    images, labels = _indexed(500)

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in iterate_batches(images, labels, 64, generator=gen)])

    assert torch.equal(epoch(3), epoch(3))
    assert not torch.equal(epoch(3), epoch(4))
    # a re-used generator advances: consecutive epochs differ
    batches = DeviceBatches(images, labels, 64, generator=torch.Generator().manual_seed(3))
    e1 = torch.cat([y for _, y in batches])
    e2 = torch.cat([y for _, y in batches])
    assert torch.equal(e1, epoch(3)) and not torch.equal(e1, e2)
    assert sorted(e2.tolist()) == list(range(500))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("n", [1000, 1003, 1025])
def test_rank_shards_partition_the_global_batch(world_size, n):
    images, labels = _indexed(n)
    batch = 64
    global_batches = [
        y for _, y in iterate_batches(images, labels, batch, generator=torch.Generator().manual_seed(7))
    ]
    per_rank = []
    for rank in range(world_size):
        gen = torch.Generator().manual_seed(7)
        loader = DeviceBatches(images, labels, batch, generator=gen, rank=rank, world_size=world_size)
        per_rank.append([y for _, y in loader])
        assert len(per_rank[-1]) == len(loader)
    steps = {len(b) for b in per_rank}
    assert len(steps) == 1, "every rank must run the same number of steps"
    for k in range(steps.pop()):
        shards = [per_rank[r][k] for r in range(world_size)]
        assert all(s.numel() > 0 for s in shards)
        # rank r holds a contiguous slice of global batch k, in rank order
        assert torch.equal(torch.cat(shards), global_batches[k])
        if global_batches[k].numel() == batch:
            assert all(s.numel() == batch // world_size for s in shards)
    covered = torch.cat([y for shards in per_rank for y in shards])
    tail = n % batch
    expected = n if tail == 0 or tail >= world_size else n - tail
    assert covered.numel() == expected and covered.unique().numel() == expected


def test_batching_argument_errors():
    images, labels = _indexed(10)
    with pytest.raises(
        ValueError, match=r"batch_size=6 is the global batch and must be divisible by world_size=4"
    ):
        list(iterate_batches(images, labels, 6, rank=0, world_size=4, generator=torch.Generator()))
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, world_size=2\), got 2"):
        DeviceBatches(images, labels, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="needs a generator seeded identically on every rank"):
        list(iterate_batches(images, labels, 4, rank=0, world_size=2))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DeviceBatches(images, labels, 0)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        DeviceBatches(images, labels[:3], 4)


def test_device_batches_moves_data_once():
    x, y = load_mnist("test")
    loader = DeviceBatches(x, y, 100, device="cpu", generator=torch.Generator().manual_seed(0))
    assert loader.images.dtype == torch.uint8 and loader.device.type == "cpu"
    assert len(loader) == 10
    xb, yb = next(iter(loader))
    assert xb.shape == (100, 1, 28, 28) and yb is not None and yb.shape == (100,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batches_on_cuda_with_cpu_generator():
    x, y = load_mnist("test")
    loader = DeviceBatches(x, y, 128, device="cuda", generator=torch.Generator().manual_seed(0))
    seen = []
    for xb, yb in loader:
        assert xb.is_cuda and xb.dtype == torch.uint8 and yb.is_cuda
        seen.append(yb)
    assert torch.cat(seen).numel() == 1000
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert sum(b[0].shape[0] for b in DeviceBatches(x, y, 128, device="cuda", generator=gen)) == 1000


# --------------------------------------------------------------------------------------------
# Untrusted files (issue 12): bounded IDX reads, pickled .pt files
# --------------------------------------------------------------------------------------------


class _CountingGzip(gzip.GzipFile):
    """A GzipFile that counts the inflated bytes it hands out (``readinto`` goes through ``read``)."""

    inflated = 0

    def read(self, size=-1):
        out = super().read(size)
        type(self).inflated += len(out)
        return out


def test_gzip_idx_is_never_inflated_past_its_declared_size(tmp_path, monkeypatch):
    # A valid (10, 28, 28) header followed by 64 MB of zeros: 64 KB of gzip. Before, the whole stream was
    # inflated (the 14 MB file became 6.5 GB) before the size check refused it.
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header)
        chunk = bytes(1 << 20)
        for _ in range(64):
            f.write(chunk)
    assert path.stat().st_size < 1 << 20
    _CountingGzip.inflated = 0
    monkeypatch.setattr(data.gzip, "GzipFile", _CountingGzip)
    with pytest.raises(
        ValueError, match=r"bomb-images-idx3-ubyte\.gz: IDX file has unexpected trailing bytes"
    ):
        read_idx(path)
    assert _CountingGzip.inflated == len(header) + 10 * 28 * 28 + 1


def test_idx_header_declaring_more_than_the_file_can_hold_is_refused_before_reading(tmp_path):
    # 6.5 GB declared by a tiny gzip file: deflate expands at most 1032-fold, so it is truncated
    path = tmp_path / "huge.idx.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 100_000, 256, 256) + bytes(100)))
    with pytest.raises(
        ValueError,
        match=r"huge\.idx\.gz: truncated IDX file: header declares shape "
        r"\(100000, 256, 256\) of uint8 \(6553600016 bytes in all\) but a gzip file of \d+ "
        r"bytes inflates to at most",
    ):
        read_idx(path)
    # the same header uncompressed: the file size is known up front
    raw = tmp_path / "huge.idx"
    raw.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 100_000, 256, 256) + bytes(100))
    with pytest.raises(ValueError, match=r"huge\.idx: truncated IDX file: .* but the file holds 116 bytes"):
        read_idx(raw)
    # beyond the absolute bound (32 GiB), whatever the file size
    big = tmp_path / "big.idx"
    big.write_bytes(bytes([0, 0, 0x0E, 2]) + struct.pack(">2I", 2**31, 2**31))
    with pytest.raises(
        ValueError,
        match=r"big\.idx: IDX header declares shape .* more than the bound "
        r"MAX_IDX_BYTES=34359738368 \(32 GiB\)",
    ):
        read_idx(big)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_header_with_70_dimensions_names_the_file(tmp_path, compress):
    path = tmp_path / "many-dims.idx"
    payload = bytes([0, 0, 8, 70]) + struct.pack(">70I", *([1] * 70)) + b"\x00"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(ValueError, match=r"many-dims\.idx: IDX header declares 70 dimensions; at most 16"):
        read_idx(path)


def test_gzip_idx_short_and_trailing_data_are_refused(tmp_path):
    short = tmp_path / "short.idx.gz"
    short.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(7)))
    with pytest.raises(
        ValueError, match=r"short\.idx\.gz: truncated IDX file: .* but the file holds 15 bytes"
    ):
        read_idx(short)
    trailing = tmp_path / "trailing.idx.gz"
    trailing.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes(5)))
    with pytest.raises(ValueError, match=r"trailing\.idx\.gz: IDX file has unexpected trailing bytes"):
        read_idx(trailing)
    ok = tmp_path / "ok.idx.gz"
    ok.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([1, 2, 3])))
    np.testing.assert_array_equal(read_idx(ok), [1, 2, 3])


def test_pickled_or_foreign_pt_data_is_refused_in_one_line(tmp_path):
    import pathlib

    pickled = tmp_path / "pickled.pt"
    torch.save({"x": torch.zeros(2, 4), "origin": pathlib.PurePosixPath("/data")}, pickled)
    with pytest.raises(ValueError) as info:
        load_data(pickled)
    message = str(info.value)
    assert message.startswith(f"data file {pickled} holds pickled Python objects (pathlib.PurePosixPath)")
    assert "weights_only=True" in message and "\n" not in message
    foreign = tmp_path / "noise.pt"
    foreign.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(
        ValueError, match=r"data file .*noise\.pt is truncated or corrupt, or not a torch file"
    ):
        load_data(foreign)
    with pytest.raises(ValueError, match=r"labels file .*pickled\.pt holds pickled Python objects"):
        load_data(torch.zeros(2, 4), labels=pickled)


def test_range_check_of_meta_and_zero_feature_data():
    check_unit_range(torch.zeros(4, 0), "x")  # nothing to check
    with pytest.raises(ValueError, match=r"x is a meta tensor \(shape \[4, 3\], no data\)"):
        check_unit_range(torch.zeros(4, 3, device="meta"), "x")

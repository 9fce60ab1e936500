"""Data loading and on-device batching for fastvae.

Everything here produces the two tensors the trainer needs:

* ``images``: ``[N, C, H, W]`` (or ``[N, F]`` for flat feature data), either ``uint8`` pixels
  (read as ``t / 255`` by the models and by :func:`fastvae.vae_loss`) or ``float32`` values
  in ``[0, 1]`` (the BCE reconstruction loss treats targets as Bernoulli probabilities);
* ``labels``: ``int64`` ``[N]``, or ``None`` when the source has none (labels are only used
  to colour the latent-space plot).

The embedded MNIST test set (10,000 images, shipped in ``fastvae/assets/mnist``) is split
deterministically: ``"train"`` is the first 9,000 images, ``"test"`` the last 1,000 (held
out).  :func:`split_train_val` with ``val_fraction=0.1`` reproduces exactly that split on the
full set, so user data and the embedded set follow one convention: the validation set is
the *last* fraction of the data, never shuffled.

Batching does not use a ``DataLoader``: the whole data set is moved to the device once, as
``uint8`` when it is pixels (MNIST is 7.8 MB), and each epoch indexes it with a device-side
permutation, so there is no per-batch host-to-device copy and no worker process.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import io
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .checkpoint import load_torch_file
from .distributed import shard_bounds

__all__ = [
    "MNIST_SPLITS",
    "MNIST_TRAIN_SIZE",
    "MNIST_TEST_SIZE",
    "IDX_DTYPES",
    "MAX_IDX_DIMS",
    "MAX_IDX_BYTES",
    "read_idx",
    "load_mnist",
    "load_data",
    "check_unit_range",
    "split_train_val",
    "to_device",
    "iterate_batches",
    "DeviceBatches",
]

MNIST_SPLITS = ("train", "test", "all")
MNIST_TRAIN_SIZE = 9_000
MNIST_TEST_SIZE = 1_000
_MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
_MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data are big-endian.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
MAX_IDX_DIMS = 16  # IDX allows 255; numpy stops at 64; data sets use 1 (labels) to 4
MAX_IDX_BYTES = 2**35  # 32 GiB: the largest array an IDX header may declare
_DEFLATE_MAX_RATIO = 1032  # deflate's largest expansion (258-byte matches in ~2 bits each)
_READ_CHUNK = 1 << 24  # 16 MiB per read
_NORMALIZE_HINT = "transforms.Normalize((0.1307,), (0.3081,))"

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------


def _read_full(stream: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes from ``stream`` (fewer only at the end of the data)."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_idx_stream(
    stream: IO[bytes], name: str, *, file_size: int | None = None, gzip_size: int | None = None
) -> np.ndarray:
    """Decode an IDX file from ``stream`` (see :func:`read_idx`); ``name`` is used in error messages.

    The header is read and checked first: the magic number, at most :data:`MAX_IDX_DIMS`
    dimensions, a declared size ``prod(shape) * itemsize`` of at most :data:`MAX_IDX_BYTES`.  For a
    raw file (``file_size`` given) the size must then equal ``header + data`` exactly, checked
    before any data is read.  For a gzip stream (``gzip_size``, the compressed size) the declared
    size must be reachable (deflate expands at most :data:`_DEFLATE_MAX_RATIO`-fold), exactly the
    declared bytes are inflated, and one more byte is asked for to detect trailing data: never more
    than ``declared + 1`` bytes are inflated, whatever the stream holds.
    """
    magic = _read_full(stream, 4)
    if len(magic) < 4:
        raise ValueError(f"{name}: too short to be an IDX file ({len(magic)} bytes, the header alone is 4+)")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        raise ValueError(
            f"{name}: bad IDX magic number 0x{magic.hex()}; expected 0x0000TTDD with type code TT in "
            f"{{{', '.join(f'0x{code:02x}' for code in IDX_DTYPES)}}} and DD the number of dimensions "
            "(e.g. 0x00000803 for uint8 images, 0x00000801 for uint8 labels)"
        )
    dtype = IDX_DTYPES[magic[2]]
    ndim = magic[3]
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    if ndim > MAX_IDX_DIMS:
        raise ValueError(
            f"{name}: IDX header declares {ndim} dimensions; at most {MAX_IDX_DIMS} are supported "
            "(images have 3, labels 1): not an IDX file, or a corrupt one"
        )
    header = 4 + 4 * ndim
    dims = _read_full(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"{name}: truncated IDX header ({4 + len(dims)} bytes, need {header} for {ndim} dims)"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    nbytes = math.prod(shape) * dtype.itemsize
    expected = header + nbytes
    declared = f"header declares shape {shape} of {dtype.name} ({expected} bytes in all)"
    if nbytes > MAX_IDX_BYTES:
        raise ValueError(
            f"{name}: IDX {declared}, more than the bound MAX_IDX_BYTES={MAX_IDX_BYTES} "
            f"({MAX_IDX_BYTES / 2**30:.0f} GiB); not loading it"
        )
    if file_size is not None and file_size < expected:
        raise ValueError(f"{name}: truncated IDX file: {declared} but the file holds {file_size} bytes")
    if file_size is not None and file_size > expected:
        raise ValueError(
            f"{name}: IDX file has {file_size - expected} unexpected trailing bytes after the "
            f"{shape} {dtype.name} array (expected {expected} bytes in all, found {file_size})"
        )
    if gzip_size is not None and expected > _DEFLATE_MAX_RATIO * gzip_size:
        raise ValueError(
            f"{name}: truncated IDX file: {declared} but a gzip file of {gzip_size} bytes inflates to "
            f"at most {_DEFLATE_MAX_RATIO * gzip_size} bytes"
        )
    buf = np.empty(nbytes, dtype=np.uint8)  # filled below, all of it, or refused
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = stream.readinto(view[got : got + _READ_CHUNK])
        if not n:
            raise ValueError(
                f"{name}: truncated IDX file: {declared} but the file holds {header + got} bytes"
            )
        got += n
    if stream.read(1):
        raise ValueError(
            f"{name}: IDX file has unexpected trailing bytes after the {shape} {dtype.name} array "
            f"(expected {expected} bytes in all; reading stopped there)"
        )
    array = buf.view(dtype).reshape(shape)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))  # native, writable


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed.

    Layout: a 4-byte magic ``0x00 0x00 TT DD`` (``TT`` the type code, ``DD`` the number of
    dimensions), then ``DD`` big-endian ``uint32`` sizes, then the data in C order, big-endian.
    Type codes: ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
    ``0x0E`` float64 (so ``0x00000803`` is a 3-D uint8 array: MNIST images; ``0x00000801`` 1-D
    uint8: labels).  Gzip is recognised by its magic bytes, whatever the file name.

    Returns a writable array in native byte order.  Raises ``ValueError`` naming the file when
    the magic number is wrong, the header is absurd (more than :data:`MAX_IDX_DIMS` dimensions, more
    than :data:`MAX_IDX_BYTES` bytes) or the size does not match the header (truncated or padded
    file).  The header is read first and a gzip file is never inflated past the declared size
    (plus one byte, to see trailing data): a small file cannot make it allocate gigabytes.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if f.read(2) != _GZIP_MAGIC:
            f.seek(0)
            return _read_idx_stream(f, str(path), file_size=size)
        f.seek(0)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                return _read_idx_stream(stream, str(path), gzip_size=size)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


# --------------------------------------------------------------------------------------------
# Embedded MNIST
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Decoded embedded MNIST test set (images ``[10000, 28, 28]`` uint8, labels ``[10000]`` uint8).

    The MD5 of each ``.gz`` file is checked against ``MD5SUMS`` first.  Cached: decoded once per
    process.  The arrays are marked read-only; callers get copies.
    """
    folder = importlib.resources.files("fastvae.assets") / "mnist"
    expected: dict[str, str] = {}
    for line in (folder / "MD5SUMS").read_text().splitlines():
        if line.strip():
            digest, fname = line.split()
            expected[fname.lstrip("*")] = digest.lower()
    arrays = []
    for fname in (_MNIST_IMAGES, _MNIST_LABELS):
        resource = folder / fname
        raw = resource.read_bytes()
        digest = hashlib.md5(raw).hexdigest()
        if fname not in expected:
            raise RuntimeError(f"{resource}: no entry in {folder / 'MD5SUMS'}")
        if digest != expected[fname]:
            raise RuntimeError(
                f"{resource}: MD5 mismatch (expected {expected[fname]}, got {digest}); the embedded "
                "MNIST file is corrupted, reinstall fastvae"
            )
        with gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb") as stream:
            array = _read_idx_stream(stream, str(resource), gzip_size=len(raw))
        array.flags.writeable = False
        arrays.append(array)
    images, labels = arrays
    if images.shape != (10_000, 28, 28) or labels.shape != (10_000,):
        raise RuntimeError(f"embedded MNIST has unexpected shapes {images.shape} and {labels.shape}")
    return images, labels


def load_mnist(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded MNIST test set: ``uint8`` images ``[N, 1, 28, 28]`` and ``int64`` labels ``[N]``.

    ``split``: ``"train"`` = the first 9,000 images, ``"test"`` = the last 1,000 (held out),
    ``"all"`` = all 10,000.  The split is fixed (no shuffling) and equals
    ``split_train_val(*load_mnist("all"), val_fraction=0.1)``.  Decoding is cached; each call
    returns fresh tensors that the caller may modify.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    images, labels = _mnist_arrays()
    rows = {
        "train": slice(0, MNIST_TRAIN_SIZE),
        "test": slice(MNIST_TRAIN_SIZE, MNIST_TRAIN_SIZE + MNIST_TEST_SIZE),
        "all": slice(None),
    }[split]
    x = torch.from_numpy(images[rows].copy()).unsqueeze(1)
    y = torch.from_numpy(labels[rows].astype(np.int64))
    return x, y


# --------------------------------------------------------------------------------------------
# Range checks and normalisation of user data
# --------------------------------------------------------------------------------------------


def check_unit_range(x: torch.Tensor | np.ndarray, name: str = "data") -> None:
    """Check that float data are finite and lie in ``[0, 1]``, as the BCE reconstruction loss needs.

    ``uint8`` data always pass (pixels are read as ``t / 255``).  Other integer types are
    refused: store pixels as ``uint8`` or scale them to float ``[0, 1]``.  The error for
    out-of-range float data gives the observed min/max and the likely cause: mean/std
    normalization such as ``transforms.Normalize((0.1307,), (0.3081,))`` (MNIST then spans
    about ``[-0.42, 2.82]``); rescale with ``x / 255`` or min-max scaling instead.
    """
    t = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.dtype == torch.uint8:
        return
    if not t.is_floating_point():
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected uint8 pixels (0..255) or floats in [0, 1]. "
            f"Convert with x.to(torch.uint8) if the values are pixels, or x.float() / x.max() to rescale."
        )
    if t.numel() == 0:
        return
    if t.device.type == "meta":  # shapes only: nothing to check, and nothing to train on
        raise ValueError(f"{name} is a meta tensor (shape {list(t.shape)}, no data); load the values first")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise ValueError(
            f"{name} contains {n_bad} non-finite value(s) (NaN or inf) out of {t.numel()}; "
            "the reconstruction targets must be finite numbers in [0, 1]"
        )
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if lo >= 0.0 and hi <= 1.0:
        return
    if lo >= 0.0 and hi <= 255.0:
        cause = (
            "they look like raw pixel values in [0, 255]: pass them as uint8 (x.to(torch.uint8)) "
            "or divide by 255"
        )
    else:
        cause = (
            "the likely cause is mean/std normalization such as "
            f"{_NORMALIZE_HINT} (MNIST then spans about [-0.42, 2.82]); drop the Normalize and "
            "rescale with x / 255 (pixels) or min-max scaling (x - x.min()) / (x.max() - x.min()) instead"
        )
    raise ValueError(
        f"{name} must lie in [0, 1] (BCE needs targets in [0, 1]: they are Bernoulli probabilities), "
        f"but observed min={lo:.6g}, max={hi:.6g}; {cause}"
    )


def _as_images(x: Any, name: str = "data", *, check_range: bool = True) -> torch.Tensor:
    """Convert images to a contiguous CPU-or-device tensor ``[N, C, H, W]`` (or ``[N, F]``).

    * ``[N, H, W]`` gains a channel dim; ``[N, H, W, C]`` with ``C`` in {1, 3, 4} and a
      dim 1 that is not a plausible channel count is permuted to channels-first;
    * ``uint8`` stays ``uint8``; ``bool`` becomes float 0/1; other floats become ``float32``
      and must be finite and in ``[0, 1]`` (see :func:`check_unit_range`);
    * other integer dtypes, empty data and 1-D or >4-D arrays are refused.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{name} has unsupported numpy dtype {x.dtype}; expected uint8 or float")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.ndim < 2 or t.ndim > 4:
        raise ValueError(
            f"{name} must have shape [N, F], [N, H, W] or [N, C, H, W], got {tuple(t.shape)} ({t.ndim}-D)"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); need at least one non-empty sample")
    if t.dtype == torch.bool:
        t = t.to(torch.float32)
    elif t.is_floating_point():
        t = t.to(torch.float32)
    elif t.dtype != torch.uint8:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected uint8 pixels (0..255) or floats in [0, 1]. "
            "Convert with x.to(torch.uint8) if the values are pixels in 0..255, or rescale to float [0, 1]"
        )
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    if check_range:
        check_unit_range(t, name)
    return t.contiguous()


def _as_labels(y: Any, n: int, name: str = "labels") -> torch.Tensor:
    """Convert labels to ``int64`` ``[N]``; integer-valued floats are accepted, others refused."""
    if isinstance(y, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(y))
    elif isinstance(y, torch.Tensor):
        t = y.detach()
    else:
        t = torch.as_tensor(np.asarray(y))
    t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the images have {n} samples")
    if t.is_floating_point():
        if not bool(torch.all(t == torch.round(t))):
            raise ValueError(f"{name} must be integer class ids, got non-integer floats")
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be integer class ids, got dtype {t.dtype}")
    return t.to(torch.int64).contiguous()


# --------------------------------------------------------------------------------------------
# load_data
# --------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("x", "images", "data", "arr_0")
_LABEL_KEYS = ("y", "labels", "targets", "arr_1")


def _pick(mapping: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in mapping:
            return mapping[key]
    return None


def _is_idx_name(name: str) -> bool:
    return "-idx" in name or name.endswith((".idx", ".idx.gz"))


def _find_idx_images(folder: Path) -> Path:
    """The images IDX file in ``folder`` (or below it): ``train-images`` first, else ``t10k-images``."""
    candidates = sorted(
        (p for p in folder.rglob("*images-idx*") if p.is_file()),
        key=lambda p: (len(p.relative_to(folder).parts), p.name.endswith(".gz"), str(p)),
    )
    for prefix in ("train-images", "t10k-images", ""):
        for path in candidates:
            if path.name.startswith(prefix):
                return path
    raise FileNotFoundError(
        f"no IDX images file (e.g. train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz]) "
        f"found in directory {folder}"
    )


def _find_idx_labels(images_path: Path) -> Path | None:
    """The labels file next to an images IDX file, if any.

    ``train-images-idx3-ubyte(.gz)`` pairs with ``train-labels-idx1-ubyte(.gz)``; failing an
    exact prefix match, a single ``*labels-idx1-ubyte*`` file in the folder is used.
    """
    folder = images_path.parent
    siblings = sorted(p for p in folder.glob("*labels-idx1-ubyte*") if p.is_file())
    name = images_path.name
    if "images-idx3" in name:
        prefix = name.split("images-idx3")[0]
        matching = [p for p in siblings if p.name.startswith(prefix + "labels-idx1")]
        if matching:
            return min(matching, key=lambda p: p.name.endswith(".gz"))
    if len(siblings) == 1:
        return siblings[0]
    return None


def _load_labels_source(labels: Any) -> Any:
    """Labels given as a path are read like data files (IDX, .npy, .npz, .pt)."""
    if not isinstance(labels, str | os.PathLike):
        return labels
    path = Path(labels)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            found = _pick(archive, _LABEL_KEYS + ("arr_0",))
            if found is None:
                raise KeyError(f"{path}: no labels array (keys {_LABEL_KEYS}) in {sorted(archive.files)}")
            return found
    if suffix in (".pt", ".pth"):
        obj = load_torch_file(path, what="labels file")
        if isinstance(obj, dict):
            found = _pick(obj, _LABEL_KEYS)
            if found is None:
                raise KeyError(f"{path}: no labels tensor (keys {_LABEL_KEYS}) in {sorted(obj)}")
            return found
        return obj
    return read_idx(path)


def load_data(
    source: str | os.PathLike | torch.Tensor | np.ndarray,
    labels: str | os.PathLike | torch.Tensor | np.ndarray | None = None,
    *,
    check_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load a data set as ``(images, labels)``: images ``[N, C, H, W]`` or ``[N, F]``, labels ``[N]`` or None.

    ``source`` may be:

    * ``"mnist"``: the embedded MNIST test set, all 10,000 images (``load_mnist("all")``);
    * a path to an IDX file (raw or ``.gz``): the labels are picked up automatically from a
      sibling ``*labels-idx1-ubyte*`` file (``train-images-idx3-ubyte.gz`` pairs with
      ``train-labels-idx1-ubyte.gz``, as in torchvision's ``MNIST/raw`` folder);
    * a directory holding IDX files (searched recursively): the ``train-images`` file if
      present, else ``t10k-images``;
    * ``.npy`` (images only), ``.npz`` (images under ``x``/``images``/``data``/``arr_0``,
      optional labels under ``y``/``labels``/``targets``/``arr_1``), ``.pt``/``.pth`` (a tensor,
      an ``(images, labels)`` tuple, or a dict with the same keys as ``.npz``; loaded with
      ``torch.load(weights_only=True)``: a file holding pickled Python objects is refused in one
      line, and no code in it runs);
    * a ``torch.Tensor`` or ``numpy`` array.

    ``labels`` (a tensor, array or path to a labels file) overrides any labels found with the
    images.  Images: ``[N, H, W]`` gains a channel dim, ``[N, F]`` stays flat, channels-last
    ``[N, H, W, C]`` is permuted; ``uint8`` stays ``uint8``, float data become ``float32`` and
    must be finite and in ``[0, 1]`` (checked unless ``check_range=False``, e.g. for the MSE
    loss); other integer types and empty data are refused.  Labels come out as ``int64``.
    """
    found_labels: Any = None
    name = "data"
    if isinstance(source, torch.Tensor | np.ndarray):
        images: Any = source
    elif isinstance(source, str) and source.lower() == "mnist":
        images, found_labels = load_mnist("all")
        name = "mnist"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise FileNotFoundError(
                f"data source {str(source)!r} does not exist; expected 'mnist', a .npy/.npz/.pt file, "
                "an IDX file or a directory holding IDX files"
            )
        suffix = path.suffix.lower()
        if path.is_dir():
            path = _find_idx_images(path)
            suffix = ""
            name = str(path)
        if suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                images = _pick(archive, _IMAGE_KEYS)
                if images is None:
                    raise KeyError(
                        f"{path}: no images array in the .npz; expected one of the keys {_IMAGE_KEYS}, "
                        f"found {sorted(archive.files)}"
                    )
                found_labels = _pick(archive, _LABEL_KEYS)
        elif suffix in (".pt", ".pth"):
            obj = load_torch_file(path, what="data file")
            if isinstance(obj, torch.Tensor):
                images = obj
            elif isinstance(obj, tuple | list) and 1 <= len(obj) <= 2:
                images = obj[0]
                found_labels = obj[1] if len(obj) == 2 else None
            elif isinstance(obj, dict):
                images = _pick(obj, _IMAGE_KEYS)
                if images is None:
                    raise KeyError(
                        f"{path}: no images tensor in the saved dict; expected one of the keys "
                        f"{_IMAGE_KEYS}, found {sorted(obj)}"
                    )
                found_labels = _pick(obj, _LABEL_KEYS)
            else:
                raise TypeError(
                    f"{path}: expected a tensor, an (images, labels) tuple or a dict, "
                    f"got {type(obj).__name__}"
                )
        else:
            images = read_idx(path)
            if labels is None:
                labels_path = _find_idx_labels(path)
                if labels_path is not None:
                    found_labels = read_idx(labels_path)
    else:
        raise TypeError(
            f"source must be 'mnist', a path, a torch.Tensor or a numpy array, got {type(source).__name__}"
        )

    x = _as_images(images, name, check_range=check_range)
    if labels is not None:
        found_labels = _load_labels_source(labels)
    y = None if found_labels is None else _as_labels(found_labels, x.shape[0])
    return x, y


# --------------------------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------------------------


def split_train_val(
    images: torch.Tensor, labels: torch.Tensor | None = None, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Deterministic split: the last ``round(N * val_fraction)`` samples are held out (no shuffling).

    Returns ``(train_images, train_labels, val_images, val_labels)`` (labels ``None`` when
    ``labels`` is None).  The pieces are views of the inputs.  ``val_fraction=0`` gives an empty
    validation set; a positive fraction always holds out at least one sample, and at least one
    sample is kept for training.  On ``load_mnist("all")`` with 0.1 this is the fixed
    9,000 / 1,000 split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n = images.shape[0]
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but images has {n}")
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    n_train = n - n_val
    if n_train < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training data out of {n} samples")
    y_train = None if labels is None else labels[:n_train]
    y_val = None if labels is None else labels[n_train:]
    return images[:n_train], y_train, images[n_train:], y_val


def to_device(data: Any, device: torch.device | str) -> Any:
    """Move a tensor (or a tuple/list/dict of tensors, or None) to ``device`` once, keeping dtypes.

    ``uint8`` pixels stay ``uint8`` on the device (4x less memory and bandwidth than float32);
    the models and :func:`fastvae.vae_loss` read them as ``t / 255``.
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, tuple | list):
        return type(data)(to_device(d, device) for d in data)
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    raise TypeError(f"to_device expects tensors (or tuples/lists/dicts of them), got {type(data).__name__}")


def _check_batch_args(batch_size: int, rank: int, world_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must be divisible by "
            f"world_size={world_size} (each rank takes batch_size / world_size rows)"
        )


def _permutation(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """``randperm(n)`` on ``device``; drawn on the generator's device and moved once if they differ."""
    gen_device = torch.device("cpu") if generator is None else generator.device
    if generator is None:
        return torch.randperm(n, device=device)
    if gen_device.type == device.type:
        return torch.randperm(n, device=device, generator=generator)
    return torch.randperm(n, device=gen_device, generator=generator).to(device)


def _num_batches(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest and not drop_last and rest >= world_size else 0)


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """One epoch of ``(images, labels)`` batches taken from tensors already on the device.

    The order is ``torch.randperm(N, device=images.device, generator=generator)`` when
    ``shuffle`` (``arange`` order otherwise, served as views without copies); each batch is a
    device-side gather with that index, so nothing crosses the host/device boundary.  A
    ``generator`` on another device than the data (e.g. a CPU generator for CUDA data) draws
    the permutation on its own device, which is then moved once per epoch.

    Sharding for DDP: ``batch_size`` is the *global* batch.  Global batch ``k`` is
    ``perm[k*batch_size : (k+1)*batch_size]`` and rank ``r`` takes its contiguous rows
    ``[r*b, (r+1)*b)`` with ``b = batch_size // world_size`` (``batch_size`` must be divisible by
    ``world_size``), so the ranks together see exactly the global batch.  A final partial global
    batch of ``m < batch_size`` rows (kept unless ``drop_last``) is split with
    ``torch.tensor_split`` into ``world_size`` contiguous pieces whose sizes differ by at most
    one; if ``m < world_size`` it is dropped, so that every rank runs the same number of steps.
    With ``world_size > 1`` and ``shuffle``, every rank must draw the same permutation, so a
    ``generator`` seeded identically on every rank (e.g. with ``seed + epoch``) is required.
    """
    _check_batch_args(batch_size, rank, world_size)
    n = images.shape[0]
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but images has {n}")
    if shuffle and world_size > 1 and generator is None:
        raise ValueError(
            "iterate_batches with world_size > 1 and shuffle=True needs a generator seeded identically "
            "on every rank (all ranks must draw the same permutation)"
        )
    perm = _permutation(n, images.device, generator) if shuffle else None
    for k in range(_num_batches(n, batch_size, world_size, drop_last)):
        start = k * batch_size
        lo, hi = shard_bounds(min(batch_size, n - start), rank, world_size)  # rank's rows of this batch
        lo, hi = start + lo, start + hi
        if perm is None:
            yield images[lo:hi], None if labels is None else labels[lo:hi]
        else:
            idx = perm[lo:hi]
            yield images[idx], None if labels is None else labels[idx]


class DeviceBatches:
    """Re-iterable on-device batcher: the data are moved to ``device`` once, each ``iter()`` is one epoch.

    ``images`` (``uint8`` pixels stay ``uint8``) and ``labels`` are moved with :func:`to_device`
    at construction; iterating calls :func:`iterate_batches` (see there for the permutation and
    the DDP sharding conventions: ``batch_size`` is the global batch, rank ``r`` takes rows
    ``[r*b, (r+1)*b)`` of each global batch with ``b = batch_size // world_size``).  ``len()`` is
    the number of steps per epoch, the same on every rank.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 128,
        *,
        device: torch.device | str | None = None,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_batch_args(batch_size, rank, world_size)
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} entries but images has {images.shape[0]}")
        device = images.device if device is None else torch.device(device)
        self.images: torch.Tensor = to_device(images, device)
        self.labels: torch.Tensor | None = to_device(labels, device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    @property
    def device(self) -> torch.device:
        """The device holding the data."""
        return self.images.device

    def __len__(self) -> int:
        return _num_batches(self.images.shape[0], self.batch_size, self.world_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        return iterate_batches(
            self.images,
            self.labels,
            self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            drop_last=self.drop_last,
            rank=self.rank,
            world_size=self.world_size,
        )

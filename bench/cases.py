"""The op cases: the grid of shapes and dtypes, their random inputs, and their minimum bytes.

A :class:`Case` is one problem: an op (``vae_loss``, ``bce_with_logits``, ``kl_divergence``,
``reparameterize``), forward alone (``"fwd"``, under ``torch.no_grad``) or forward and backward
(``"fwd+bwd"``: the loss and the gradients with respect to logits, mu and logvar), a batch ``B``,
a number of features ``F`` (logits and target: ``[B, F]``), a latent width ``D`` (mu and logvar:
``[B, D]``), a dtype for logits/mu/logvar (fp32 or bf16) and a target kind (``"float"``: in
[0, 1], same dtype as the logits; ``"uint8"``: pixels, read as ``t / 255``).

Minimum bytes (:func:`min_bytes`): every input read once and every output written once, with
``s`` the bytes of the dtype (4 fp32, 2 bf16) and ``st`` those of the target (``s``, or 1 for
uint8).  Scalar losses and per-row partial sums (8 bytes a row) are left out: they are at most
0.1% of the total at F = 784.

=================  ==========================================  =====================================
op                 fwd                                         fwd+bwd
=================  ==========================================  =====================================
vae_loss           ``B*F*(s + st) + 2*B*D*s``                  ``B*F*(2s + st) + 4*B*D*s``
bce_with_logits    ``B*F*(s + st)``                            ``B*F*(2s + st)``
kl_divergence      ``2*B*D*s``                                 ``4*B*D*s``
reparameterize     ``3*B*D*s`` (read mu, logvar; write z)      ``6*B*D*s`` (+ read dz, logvar; write
                                                               dlogvar; dmu = dz is the same tensor)
=================  ==========================================  =====================================

e.g. the headline vae_loss fwd+bwd at 4096 x 784, D = 20, fp32, float target:
``4096*784*12 + 4096*20*16 = 39.8 MB``.

Inputs (:func:`make_inputs`): never zeros; logits ~ N(0, 2^2) (standard deviation 2), targets are
real MNIST pixels when F = 784 (random rows of the embedded set) and uniform otherwise, mu ~ N(0, 1),
logvar ~ 0.5 N(0, 1), the upstream gradient of reparameterize ~ N(0, 1).  Each case has several
input sets, built from fixed seeds, so every implementation sees the same values; the timed calls
rotate through them (:func:`input_sets`) so that their total size exceeds the last-level cache
(GPU L2) three times over and every call reads from memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

OPS = ("vae_loss", "bce_with_logits", "kl_divergence", "reparameterize")
MODES = ("fwd+bwd", "fwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = ("float", "uint8")

BATCHES = (128, 512, 1024, 4096, 16384, 65536)
FEATURES = (784, 3072, 12288)  # MNIST, CIFAR-sized 3x32x32, 3x64x64
LATENTS = (2, 20, 128)

BASE_SEED = 20_240_601
MAX_INPUT_SETS = 64
# Largest tensor (elements) a case may have: on 2 CPU cores an eager fwd+bwd of 2^24 elements
# already takes about a second per call; on a GPU the limit is its memory (see fits_on).
CPU_MAX_ELEMENTS = 2**24


@dataclass(frozen=True)
class Case:
    """One benchmark problem (see the module docstring); ``compile`` says whether torch.compile runs."""

    op: str
    mode: str
    batch: int
    features: int = 0  # F; 0 for kl_divergence and reparameterize
    latent: int = 0  # D; 0 for bce_with_logits
    dtype: str = "fp32"
    target: str = "float"  # "float" or "uint8"; "" for the ops without a target
    compile: bool = field(default=True, compare=False)  # quick mode compiles only a few cases

    @property
    def has_recon(self) -> bool:
        return self.op in ("vae_loss", "bce_with_logits")

    @property
    def has_latent(self) -> bool:
        return self.op != "bce_with_logits"

    @property
    def id(self) -> str:
        """Readable and unique: ``vae_loss fwd+bwd 4096x784 D=20 fp32 float``."""
        shape = f"{self.batch}x{self.features}" if self.has_recon else f"{self.batch}"
        parts = [self.op, self.mode, shape]
        if self.has_latent:
            parts.append(f"D={self.latent}")
        parts.append(self.dtype)
        if self.has_recon:
            parts.append(self.target)
        return " ".join(parts)

    @property
    def elements(self) -> int:
        """Elements of the largest tensor of the case."""
        return self.batch * max(self.features, self.latent)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["id"] = self.id
        return d


HEADLINE = Case("vae_loss", "fwd+bwd", 4096, 784, 20, "fp32", "float")


def min_bytes(case: Case) -> int:
    """Bytes a perfect implementation moves: each input read once, each output written once."""
    s = DTYPES[case.dtype].itemsize
    st = 1 if case.target == "uint8" else s
    B, F, D = case.batch, case.features, case.latent
    bwd = case.mode == "fwd+bwd"
    if case.op == "vae_loss":
        return B * F * (2 * s + st if bwd else s + st) + B * D * s * (4 if bwd else 2)
    if case.op == "bce_with_logits":
        return B * F * (2 * s + st if bwd else s + st)
    if case.op == "kl_divergence":
        return B * D * s * (4 if bwd else 2)
    if case.op == "reparameterize":
        return B * D * s * (6 if bwd else 3)
    raise ValueError(f"unknown op {case.op!r}")


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------


def _vae(mode: str, B: int, F: int = 784, D: int = 20, dtype: str = "fp32", target: str = "float", **kw):
    return Case("vae_loss", mode, B, F, D, dtype, target, **kw)


def smoke_cases() -> list[Case]:
    """Tiny cases covering every op, both modes, uint8 targets and bf16: every code path, quickly."""
    return [
        _vae("fwd+bwd", 64, compile=False),
        _vae("fwd", 64, dtype="bf16", target="uint8", compile=False),
        Case("bce_with_logits", "fwd+bwd", 64, 784, 0, "fp32", "uint8", compile=False),
        Case("kl_divergence", "fwd+bwd", 64, 0, 20, "fp32", "", compile=False),
        Case("reparameterize", "fwd+bwd", 64, 0, 20, "bf16", "", compile=False),
    ]


# The batches people train with (pytorch/examples uses 128) and the latent ops' sizes of issue 9.
TRAINING_BATCHES = (32, 128, 512)
REPARAMETERIZE_SHAPES = ((128, 20), (4096, 20), (1024, 64))


def training_size_cases() -> list[Case]:
    """The cases of the training-size targets, each compiled too (quick and full mode):
    ``vae_loss`` fwd+bwd at B in {32, 128, 512} x 784 x latent 20, fp32 with float and with uint8
    targets, and ``reparameterize`` fwd+bwd at 128 x 20, 4,096 x 20 and 1,024 x 64, fp32."""
    cases = [_vae("fwd+bwd", B, target=t) for B in TRAINING_BATCHES for t in TARGETS]
    cases += [Case("reparameterize", "fwd+bwd", B, 0, D, "fp32", "") for B, D in REPARAMETERIZE_SHAPES]
    return cases


def quick_cases(device: torch.device) -> list[Case]:
    """A small subset around the headline 4,096 x 784 fp32 vae_loss fwd+bwd.

    torch.compile costs 10 to 70 s per graph on a 2-core CPU and tens of seconds per graph and mode
    on a GPU, so quick mode compiles only the headline cases, the training-size cases
    (:func:`training_size_cases`) and, on a GPU, the large vae_loss cases of the bandwidth target;
    the full grid compiles everything.
    """
    gpu = device.type == "cuda"
    cases = [
        HEADLINE,
        _vae("fwd", 4096),
        _vae("fwd+bwd", 4096, target="uint8", compile=False),
        _vae("fwd+bwd", 4096, dtype="bf16", compile=False),
        _vae("fwd+bwd", 16384, compile=False),
        Case("bce_with_logits", "fwd+bwd", 4096, 784, 0, "fp32", "float", compile=False),
        Case("kl_divergence", "fwd+bwd", 4096, 0, 20, "fp32", "", compile=False),
        Case("reparameterize", "fwd", 4096, 0, 20, "fp32", "", compile=False),
        *training_size_cases(),
    ]
    if gpu:  # the bandwidth target is about large sizes
        cases += [_vae("fwd+bwd", 65536), _vae("fwd+bwd", 65536, 3072), _vae("fwd+bwd", 16384, 12288)]
    return cases


def full_cases(device: torch.device) -> list[Case]:
    """The whole grid: batch 128 to 65,536 x features 784 / 3,072 / 12,288 x latent 2 / 20 / 128,
    fp32 and bf16, float and uint8 targets (a cross product of the main axes, variants at a few
    sizes).  Cases too large for the device are dropped by :func:`fits_on`."""
    cases: list[Case] = training_size_cases()
    cases += [_vae("fwd+bwd", B, F) for F in FEATURES for B in BATCHES]
    cases += [_vae("fwd", B) for B in BATCHES]
    for B, F in ((4096, 784), (65536, 784), (16384, 3072)):
        cases += [
            _vae("fwd+bwd", B, F, dtype="bf16"),
            _vae("fwd+bwd", B, F, target="uint8"),
            _vae("fwd+bwd", B, F, dtype="bf16", target="uint8"),
        ]
    cases += [_vae("fwd+bwd", 4096, D=D) for D in LATENTS if D != 20]
    cases += [Case("bce_with_logits", "fwd+bwd", B, 784, 0, "fp32", "float") for B in BATCHES]
    cases += [
        Case("bce_with_logits", "fwd+bwd", 4096, 784, 0, "fp32", "uint8"),
        Case("bce_with_logits", "fwd", 4096, 784, 0, "fp32", "float"),
    ]
    for B in (128, 4096, 65536):
        cases += [Case("kl_divergence", "fwd+bwd", B, 0, D, "fp32", "") for D in LATENTS]
    cases += [Case("kl_divergence", "fwd", 4096, 0, 20, "fp32", "")]
    for mode in MODES:
        for B in (128, 4096, 65536):
            cases += [Case("reparameterize", mode, B, 0, D, "fp32", "") for D in (20, 128)]
    cases += [Case("reparameterize", "fwd", 65536, 0, 128, "bf16", "")]
    return list(dict.fromkeys(cases))  # Case equality ignores ``compile``: the first occurrence wins


def fits_on(case: Case, device: torch.device) -> str | None:
    """Why ``case`` is left out on ``device`` (None if it runs)."""
    if device.type == "cpu":
        if case.elements > CPU_MAX_ELEMENTS:
            return f"{case.elements:,} elements per tensor > the CPU limit {CPU_MAX_ELEMENTS:,} (time)"
        return None
    # Inputs, gradients, eager intermediates (about 8 tensors of [B, F] fp32) and the float64
    # reference of a chunk: keep it under 60% of the device memory.
    need = 8 * case.elements * 4
    total = torch.cuda.get_device_properties(device).total_memory
    if need > 0.6 * total:
        return f"needs about {need / 2**30:.0f} GiB, more than 60% of the device's {total / 2**30:.0f} GiB"
    return None


def cases_for(mode: str, device: torch.device) -> list[Case]:
    """The grid of a run mode: ``"smoke"``, ``"quick"`` or ``"full"``."""
    return {"smoke": lambda d: smoke_cases(), "quick": quick_cases, "full": full_cases}[mode](device)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One input set of a case (tensors absent for an op are None)."""

    logits: torch.Tensor | None = None
    target: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    dz: torch.Tensor | None = None  # upstream gradient of reparameterize (fwd+bwd)
    seed: int = 0  # fastvae.reparameterize's seed

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.logits, self.target, self.mu, self.logvar, self.dz) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def grad_inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors the gradients are taken with respect to, in the order implementations return them."""
        return tuple(t for t in (self.logits, self.mu, self.logvar) if t is not None)

    def with_moderate_logits(self) -> Inputs:
        """A copy with logits halved (N(0, 1)): sigmoid + BCE clamps log(p) at -100 and saturates
        sigmoid in bf16, so the eager-seed form is checked on moderate logits."""
        if self.logits is None:
            return self
        logits = (self.logits.detach() * 0.5).requires_grad_(self.logits.requires_grad)
        return replace(self, logits=logits)


@functools.lru_cache(maxsize=4)
def _mnist_pixels(device_str: str) -> torch.Tensor | None:
    """The embedded MNIST images as uint8 ``[N, 784]`` on the device (None without fastvae.data)."""
    try:
        from fastvae.data import load_mnist
    except ImportError:
        return None
    images, _ = load_mnist("all")
    return images.reshape(images.shape[0], -1).to(device_str)


def _targets(case: Case, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    B, F = case.batch, case.features
    pixels = _mnist_pixels(str(device)) if F == 784 else None
    if pixels is not None:
        t = pixels[torch.randint(0, pixels.shape[0], (B,), generator=gen, device=device)]
    elif case.target == "uint8":
        t = torch.randint(0, 256, (B, F), generator=gen, device=device, dtype=torch.uint8)
    else:  # uniform in [0, 1], not quantised
        return torch.rand(B, F, generator=gen, device=device).to(DTYPES[case.dtype])
    return t if case.target == "uint8" else (t.float() / 255).to(DTYPES[case.dtype])


def make_inputs(case: Case, device: torch.device, index: int = 0) -> Inputs:
    """Input set number ``index`` of ``case``: the same values for every implementation."""
    gen = torch.Generator(device=device)
    gen.manual_seed(BASE_SEED + 7919 * index)
    dtype = DTYPES[case.dtype]
    grad = case.mode == "fwd+bwd"

    def normal(rows: int, cols: int, scale: float) -> torch.Tensor:
        x = torch.randn(rows, cols, generator=gen, device=device) * scale
        return x.to(dtype).requires_grad_(grad)

    inputs = Inputs(seed=BASE_SEED + index)
    if case.has_recon:
        inputs.logits = normal(case.batch, case.features, 2.0)
        inputs.target = _targets(case, device, gen)
    if case.has_latent:
        inputs.mu = normal(case.batch, case.latent, 1.0)
        inputs.logvar = normal(case.batch, case.latent, 0.5)
    if case.op == "reparameterize" and grad:
        inputs.dz = torch.randn(case.batch, case.latent, generator=gen, device=device).to(dtype)
    return inputs


def input_sets(
    case: Case, device: torch.device, cache: int, *, max_sets: int = MAX_INPUT_SETS
) -> list[Inputs]:
    """Enough input sets that, rotated, they are three times the size of the cache ``cache``."""
    first = make_inputs(case, device, 0)
    n = max(1, min(max_sets, math.ceil(3 * cache / max(first.nbytes, 1))))
    return [first] + [make_inputs(case, device, i) for i in range(1, n)]

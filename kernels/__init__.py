"""fastvae's kernel sources, installed as ``fastvae.kernels``.

* ``reparameterize.py`` -- Triton: z = mu + exp(logvar/2) * eps, eps from in-kernel Philox.
* ``fused_loss.py``     -- Triton: per-row BCE/MSE reconstruction + beta * KL and their gradients, one pass.
* ``numba_cpu.py``      -- Numba: the same two kernels for CPU tensors (the fast CPU backend).
* ``cuda/``             -- CUDA C of the same math, for the CuPy backend.

The Triton modules are imported lazily by ``fastvae.ops`` so that ``TRITON_INTERPRET=1`` can be set
(on machines without a GPU) before their ``@triton.jit`` decorators run.
"""

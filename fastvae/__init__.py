"""fastvae: fused Triton kernels for variational autoencoders."""

"""Fused ops: Triton kernels, chunked-torch paths, CUDA-module wrappers and their autograd wiring."""

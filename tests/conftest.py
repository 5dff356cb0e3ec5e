"""Test-wide settings: one intra-op thread. The suite's tensors are small, and with two
threads a busy second core slows PyTorch's CPU kernels 7-40x (see DATA.md)."""

import torch

torch.set_num_threads(1)

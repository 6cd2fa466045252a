"""The yardsticks: a closed-form float64 reference, naive XLA autodiff, and fused
Pallas and Triton kernels (imported lazily through `mgd.backends`)."""

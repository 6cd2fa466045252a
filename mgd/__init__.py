"""MetaGrad-Distill: the double backward of causal attention, and the data-selection
pipeline built on it."""
from mgd.backends import BackendUnavailable, available
from mgd.op import attention, attention_backward, attention_double_backward, attention_forward

__all__ = ["attention", "attention_forward", "attention_backward", "attention_double_backward",
           "available", "BackendUnavailable"]
__version__ = "0.1.0"

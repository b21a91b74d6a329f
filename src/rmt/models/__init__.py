"""RMT models: the network (registered in timm), MaSA, the reference oracle and weight files."""
from .masa import MaSA, MaSATables, RelPos2d
from .rmt import MODEL_ARGS, RMT, CheckpointMismatchError, checkpoint_filter_fn, guess_variant
from .weights import CheckpointError, convert_checkpoint, read_state_dict, save_weights

__all__ = [
    "RMT", "MaSA", "MaSATables", "RelPos2d", "MODEL_ARGS", "checkpoint_filter_fn", "guess_variant",
    "CheckpointError", "CheckpointMismatchError", "convert_checkpoint", "read_state_dict", "save_weights",
]

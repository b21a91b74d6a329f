"""RMT models: the network (registered in timm), MaSA, the reference oracle, weight files and the
dense-prediction backbone.

Layers, bottom up: ``fast`` (fused ops, compiled kernel) -> ``masa`` -> ``weights`` (checkpoint I/O and
key mapping) -> ``rmt`` (network, variants, timm registration) -> ``factory`` (building by name, with
weights) -> ``backbone``. ``reference`` stands alone.
"""
from .backbone import RMTBackbone, load_backbone_weights
from .factory import checkpoint_info, convert_checkpoint, create_model, list_models, split_name
from .masa import MaSA, MaSATables, RelPos2d
from .rmt import MODEL_ARGS, RMT, checkpoint_filter_fn, guess_variant
from .weights import CheckpointError, CheckpointMismatchError, read_state_dict, save_weights

__all__ = [
    "RMT", "MaSA", "MaSATables", "RelPos2d", "MODEL_ARGS", "checkpoint_filter_fn", "guess_variant",
    "CheckpointError", "CheckpointMismatchError", "convert_checkpoint", "read_state_dict", "save_weights",
    "RMTBackbone", "load_backbone_weights", "checkpoint_info", "create_model", "list_models", "split_name",
]

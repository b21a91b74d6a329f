"""Tools built on the models: FLOPs, benchmark, export (with int8 quantization), visualisation of MaSA."""

"""Tools built on the models: FLOPs, benchmark, predict, export, visualisation."""

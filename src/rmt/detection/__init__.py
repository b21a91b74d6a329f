"""Object detection and instance segmentation with RMT backbones (torchvision detectors)."""

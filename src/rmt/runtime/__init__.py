"""The inference layer: what running a model needs, below training, the tools and the tasks.

* :mod:`~rmt.runtime.processes`: the device a process computes on, and how an evaluation is shared
  by the processes of a group (sharding, sums, gathering);
* :mod:`~rmt.runtime.precision`: the numeric precision (``--amp``), chosen in one place;
* :mod:`~rmt.runtime.progress`: progress bars;
* :mod:`~rmt.runtime.classifier`: a classifier loaded for inference (``rmt predict``, :func:`rmt.predict`,
  export, quantization, the attention pictures, the demo);
* :mod:`~rmt.runtime.accuracy`: a classifier's top-1/top-5 accuracy over a labelled dataset;
* :mod:`~rmt.runtime.draw`: pictures of dense predictions (boxes, masks, segmentations);
* :mod:`~rmt.runtime.memory`: process settings for fast CPU runs (glibc keeps freed memory).

This package imports only :mod:`rmt.models`, :mod:`rmt.data` and the modules below them, so that
loading a model for inference (and ``import rmt``) never loads the training layer.
"""

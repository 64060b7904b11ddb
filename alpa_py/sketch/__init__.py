"""Sketching primitives with a job inside the product.

* :mod:`alpa_py.sketch.kmeans`: k-means++ seeding (FastKmeans++'s
  projected proposal with rejection to exact D^2 sampling, and the plain
  algorithm), Lloyd's refinement, the k-means cost.
* :mod:`alpa_py.sketch.kernel_sum`: ``KernelSum``, a dynamic kernel-sum
  (kernel density) structure with a per-query guarantee under adaptive
  queries.
* :mod:`alpa_py.sketch.attention`: ``KVAttention``, softmax attention over
  a dynamic key-value set (the serving engine's ``attention="kernel_sum"``):
  heavy buckets exactly, the rest by importance sampling.
"""

from alpa_py.sketch.attention import KVAttention
from alpa_py.sketch.kernel_sum import KernelSum
from alpa_py.sketch.kmeans import kmeans_cost, kmeans_plusplus, lloyd

__all__ = ["KVAttention", "KernelSum", "kmeans_cost", "kmeans_plusplus", "lloyd"]

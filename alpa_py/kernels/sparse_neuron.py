"""Firing-neuron operators for wide layers with a shifted ReLU (re-exports).

The index and the operators that read it live in two modules:

* :mod:`alpa_py.kernels.firing_index`: :class:`FiringIndex` (the stored
  correlations and their tree levels: build, query, update, refresh) and
  the firing sets / union it returns;
* :mod:`alpa_py.kernels.sparse_kernels`: the gather-and-accumulate
  operators over a union of firing neurons (``forward``,
  ``transpose_apply``: Pallas kernels and jnp references).

This module keeps the names importable from their former single home.
"""

from alpa_py.kernels.firing_index import check_threshold as check_threshold
from alpa_py.kernels.firing_index import choose_capacity as choose_capacity
from alpa_py.kernels.firing_index import compact as compact
from alpa_py.kernels.firing_index import correlations as correlations
from alpa_py.kernels.firing_index import FiringIndex as FiringIndex
from alpa_py.kernels.firing_index import FiringSets as FiringSets
from alpa_py.kernels.firing_index import Union as Union
from alpa_py.kernels.sparse_kernels import BACKENDS as BACKENDS
from alpa_py.kernels.sparse_kernels import forward as forward
from alpa_py.kernels.sparse_kernels import forward_pallas as forward_pallas
from alpa_py.kernels.sparse_kernels import forward_reference as forward_reference
from alpa_py.kernels.sparse_kernels import SparseBlockSizes as SparseBlockSizes
from alpa_py.kernels.sparse_kernels import transpose_apply as transpose_apply
from alpa_py.kernels.sparse_kernels import transpose_apply_pallas as transpose_apply_pallas
from alpa_py.kernels.sparse_kernels import transpose_apply_reference as transpose_apply_reference

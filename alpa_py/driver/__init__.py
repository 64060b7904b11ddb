"""Compile drivers: one compile is a chain of named passes over frozen values.

``compile_step`` is the single entry point ``api.py`` uses: it resolves the
method once and runs the ShardParallel or PipeshardParallel chain for the
backend the step will run on.
"""

from __future__ import annotations

from typing import Callable

from alpa_py.driver.config import ShardConfig
from alpa_py.driver.executable import Executable, PipeshardExecutable
from alpa_py.driver.pipeshard_parallel import compile_pipeshard
from alpa_py.driver.shard_parallel import compile_shard_parallel
from alpa_py.driver.signature import Signature
from alpa_py.methods import PipeshardParallel, ShardParallel
from alpa_py.runtime.backend import Backend


def compile_step(fun: Callable, sig: Signature,
                 method: ShardParallel | PipeshardParallel,
                 backend: Backend,
                 leaves=None) -> Executable | PipeshardExecutable:
  """Compiles ``fun`` for ``sig`` under ``method``, loaded on ``backend``
  (``leaves``: the call's flat arguments, for a selection that times its
  candidates)."""
  if isinstance(method, PipeshardParallel):
    return compile_pipeshard(fun, sig, method, backend)
  config = ShardConfig.resolve(method, len(sig.devices))
  return compile_shard_parallel(fun, sig, config, backend, leaves)

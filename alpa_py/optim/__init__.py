"""Optimizers for JAX models: Gram-Gauss-Newton (Newton-type, in the dual)
and sparse gradient descent on a shifted-ReLU layer's firing index."""

from alpa_py.optim.ggn_solvers import SingularGramError as SingularGramError
from alpa_py.optim.newton import GGNState as GGNState
from alpa_py.optim.newton import GramGaussNewton as GramGaussNewton
from alpa_py.optim.newton import gram_gauss_newton as gram_gauss_newton
from alpa_py.optim.newton import SparseGramGaussNewton as SparseGramGaussNewton
from alpa_py.optim.sparse_sgd import SparseSGD as SparseSGD

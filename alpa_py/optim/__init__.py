"""Optimizers (Newton-type) for JAX models."""

from alpa_py.optim.newton import GGNState as GGNState
from alpa_py.optim.newton import GramGaussNewton as GramGaussNewton
from alpa_py.optim.newton import gram_gauss_newton as gram_gauss_newton
from alpa_py.optim.newton import SingularGramError as SingularGramError

"""Online bipartite matching with inner-product weights (exact or through a
sublinear maximum-inner-product structure); used by the MoE router
(``MoELayer(router="online_matching")``)."""

from alpa_py.matching.online import adversarial_instance as adversarial_instance
from alpa_py.matching.online import competitive_ratio_bound as competitive_ratio_bound
from alpa_py.matching.online import greedy as greedy
from alpa_py.matching.online import MatchResult as MatchResult
from alpa_py.matching.online import offline_optimum as offline_optimum
from alpa_py.matching.online import primal_dual as primal_dual
from alpa_py.matching.weights import ClusteredMIPS as ClusteredMIPS
from alpa_py.matching.weights import ExactWeights as ExactWeights
from alpa_py.matching.router import online_matching_top2 as online_matching_top2

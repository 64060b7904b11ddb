"""alpa_py: auto-parallelizing training compiler for JAX."""

# OR-Tools' solver module is loaded first, before anything that might load
# TensorFlow: when TensorFlow's native libraries are loaded before OR-Tools',
# OR-Tools' HiGHS backend crashes the process (SIGSEGV inside ``Solve``, no
# status to recover from); loaded in this order, both work. Where the user
# imported tensorflow before alpa_py, ``compiler.ilp`` leaves HiGHS out and
# warns.
from ortools.linear_solver import pywraplp as _pywraplp  # noqa: F401

from alpa_py.api import parallelize as parallelize
from alpa_py.api import ParallelizedFunc as ParallelizedFunc
from alpa_py.api import RecompileWarning as RecompileWarning
from alpa_py.compiler.auto_sharding import InfeasiblePlanError as InfeasiblePlanError
from alpa_py.compiler.calibration import CalibrationCacheWarning as CalibrationCacheWarning
from alpa_py.compiler.cluster_env import calibrate as calibrate
from alpa_py.compiler.cluster_env import CostProfile as CostProfile
from alpa_py.compiler.collectives import PlanMismatchWarning as PlanMismatchWarning
from alpa_py.compiler.control_flow import ReplicatedControlFlowWarning as ReplicatedControlFlowWarning
from alpa_py.compiler.ilp import SolverFallbackWarning as SolverFallbackWarning
from alpa_py.compiler.layers import AutoLayerOption as AutoLayerOption
from alpa_py.compiler.layers import ManualLayerOption as ManualLayerOption
from alpa_py.compiler.markers import grad as grad
from alpa_py.compiler.markers import mark_pipeline_boundary as mark_pipeline_boundary
from alpa_py.compiler.markers import value_and_grad as value_and_grad
from alpa_py.compiler.strategies.registry import UnsupportedPrimitiveWarning as UnsupportedPrimitiveWarning
from alpa_py.driver.executable import Executable as Executable
from alpa_py.driver.executable import PipeshardExecutable as PipeshardExecutable
from alpa_py.driver.plans import PipeshardPlan as PipeshardPlan
from alpa_py.driver.plans import ShardingPlan as ShardingPlan
from alpa_py.methods import AutoShardingOption as AutoShardingOption
from alpa_py.compiler.stages import AutoStageOption as AutoStageOption
from alpa_py.compiler.stages import ManualStageOption as ManualStageOption
from alpa_py.compiler.stages import UniformStageOption as UniformStageOption
from alpa_py.methods import DataParallel as DataParallel
from alpa_py.methods import PipeshardParallel as PipeshardParallel
from alpa_py.methods import ShardParallel as ShardParallel
from alpa_py.methods import Zero2Parallel as Zero2Parallel
from alpa_py.methods import Zero3Parallel as Zero3Parallel
from alpa_py import optim as optim
from alpa_py.runtime.cluster import init as init
from alpa_py.runtime.cluster import shutdown as shutdown

__version__ = "0.1.0"

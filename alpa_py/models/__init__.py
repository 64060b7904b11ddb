"""Plain Flax models for tests, examples and benchmarks (no mesh knowledge)."""

from alpa_py.models.conv import ConvNet as ConvNet
from alpa_py.models.gpt import GPT as GPT
from alpa_py.models.gpt import GPTConfig as GPTConfig
from alpa_py.models.lora import LoRADense as LoRADense
from alpa_py.models.mlp import MLP as MLP
from alpa_py.models.moe import MoELayer as MoELayer
from alpa_py.models.moe import MoEModel as MoEModel
from alpa_py.models.sparse_mlp import SparseMLP as SparseMLP
from alpa_py.models.sparse_mlp import SparseSGD as SparseSGD
from alpa_py.models.wide_resnet import WideResNet as WideResNet

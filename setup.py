"""alpa_py: auto-parallelizing training compiler for JAX."""

from setuptools import find_packages, setup

setup(
    name="alpa_py",
    version="0.1.0",
    description="Auto-parallelizing training compiler for JAX (Alpa on today's JAX)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["alpa_py", "alpa_py.*"]),
    # recorded LoRA backend measurements (benchmarks/lora_kernels.py --record)
    package_data={"alpa_py.kernels": ["*.json"],
                  "alpa_py.serve": ["data/*.csv", "data/*/*.csv",
                                    "data/*/*.json",
                                    "data/*/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.0,<0.12",
        "jaxlib>=0.10.0,<0.12",
        "flax>=0.10.0,<0.14",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ortools>=9.12,<10",
        "numpy>=1.26,<3",
        "ray>=2.40,<3",
        "flatbuffers>=24.3,<26",
        # `alpa-py bench` and the simulations draw their figures
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # equinox: tests/test_signatures.py passes an Equinox module whole;
        # equinox and dm-haiku: tests/test_model_zoo.py writes steps the way
        # each library's docs do
        "test": ["pytest>=8,<10", "hypothesis>=6.100,<7",
                 "equinox>=0.13.8,<0.14", "dm-haiku>=0.0.17,<0.1"],
        # tests/test_solver_backends.py: TensorFlow imported before alpa_py
        # (its native libraries crash OR-Tools' HiGHS when loaded first);
        # kept out of "test", where it would weigh on every install
        "tf": ["tensorflow-cpu>=2.21,<3; sys_platform == 'linux'",
               "tensorflow>=2.21,<3; sys_platform != 'linux'"],
        "gpu": ["cupy-cuda13x>=13,<15"],
        # alpa-py serve: the OpenAI-compatible HTTP API (httpx: its tests'
        # client)
        "serve": ["fastapi>=0.110,<1", "uvicorn>=0.29,<1", "httpx>=0.27,<1"],
        # benchmarks/newton.py: digits data and the jaxopt baseline
        "bench": ["scikit-learn>=1.4,<2", "jaxopt>=0.8,<0.9"],
    },
    entry_points={"console_scripts": ["alpa-py=alpa_py.cli:main"]},
)

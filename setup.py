"""Install the `mot` and `moe` packages.

Build with `pip install --no-build-isolation -e .` against the torch already installed (the
compiled kernels of `csrc/` must link against the same torch the packages import).
"""

from setuptools import find_packages, setup

setup(
    name="mot-moe",
    version="0.1.0",
    description="Native multimodal transformers with dense, Mixture-of-Transformers and "
                "Mixture-of-Experts blocks on one joint-attention backbone",
    python_requires=">=3.10",
    packages=find_packages(include=["mot", "mot.*", "moe", "moe.*"]),
    install_requires=["torch>=2.5", "numpy", "tensorboard", "tqdm", "pyyaml"],
    extras_require={
        "dev": ["pytest", "ruff", "transformers"],  # transformers: interop tests, benchmarks
        "gpu": ["flash-attn", "megablocks"],
    },
)

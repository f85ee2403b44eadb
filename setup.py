"""Install the `mot` and `moe` packages and build the kernels of `csrc/` into `moe._C`.

Build with `pip install --no-build-isolation -e .` against the torch already installed (the
kernels must link against the torch the packages import). The C++ (CPU, OpenMP) kernels are
always built; the CUDA ones are added when torch has CUDA and nvcc is found.
Environment switches: MOE_NO_EXTENSION=1 builds no kernels at all (the PyTorch references run);
MOE_NO_CUDA=1 skips the CUDA kernels.
"""

import os

from setuptools import find_packages, setup


def extensions():
    if os.environ.get("MOE_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    flags = ["-O3", "-fopenmp", "-std=c++20"]
    sources = ["csrc/moe_ops.cpp", "csrc/fused_cpu.cpp", "csrc/qkv_cpu.cpp",
               "csrc/router_cpu.cpp", "csrc/group_gemm_cpu.cpp", "csrc/swiglu_ffn_cpu.cpp",
               "csrc/autograd.cpp"]
    with_cuda = (os.environ.get("MOE_NO_CUDA") != "1" and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "moe._C", sources + ["csrc/moe_ops_cuda.cu"],
            extra_compile_args={"cxx": flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("moe._C", sources, extra_compile_args=flags,
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="mot-moe",
    version="0.1.0",
    description="Native multimodal transformers with dense, Mixture-of-Transformers and "
                "Mixture-of-Experts blocks on one joint-attention backbone",
    python_requires=">=3.10",
    packages=find_packages(include=["mot", "mot.*", "moe", "moe.*"]),
    install_requires=["torch>=2.5", "numpy", "tensorboard", "tqdm", "pyyaml", "scikit-learn",
                      "tokenizers", "matplotlib"],
    extras_require={
        "dev": ["pytest", "ruff", "transformers"],  # transformers: interop tests, benchmarks
        "gpu": ["flash-attn", "megablocks"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

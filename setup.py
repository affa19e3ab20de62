"""Build script for kvpress-kernels.

Pure-Python install (Triton + PyTorch reference ops) always works. When `nvcc` is found and
``KVPRESS_KERNELS_SKIP_CUDA`` is not set, the optional torch-free CUDA extension
``kvpress_kernels._C`` is built through CMake (see CMakeLists.txt). Honoured variables:
``TORCH_CUDA_ARCH_LIST`` / ``KVPRESS_KERNELS_CUDA_ARCHS`` (e.g. "80;90"), ``MAX_JOBS``, ``DEBUG=1``
(device debug info, ``-G``). This file never imports torch.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_archs() -> str:
    explicit = os.environ.get("KVPRESS_KERNELS_CUDA_ARCHS")
    if explicit:
        return explicit
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if torch_list:
        archs = []
        for item in torch_list.replace(",", ";").replace(" ", ";").split(";"):
            item = item.strip()
            if not item:
                continue
            ptx = item.endswith("+PTX")
            num = item.replace("+PTX", "").replace(".", "")
            archs.append(f"{num}-real" if not ptx else f"{num}")
        return ";".join(archs)
    # sm_80 and sm_90 machine code plus PTX for newer GPUs.
    return "80-real;90-real;90-virtual"


def _want_cuda() -> bool:
    if os.environ.get("KVPRESS_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return False
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # build-time requirement only

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        debug = os.environ.get("DEBUG", "0") not in ("", "0")
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_archs()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
            f"-DKVPK_DEBUG={'ON' if debug else 'OFF'}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", str(ROOT), *cfg], cwd=build_temp)
        subprocess.check_call(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp)


ext_modules = [CMakeExtension("kvpress_kernels._C")] if _want_cuda() else []

extras = {
    # The integration needs transformers 5 (its Cache-layer and attention interfaces) and runs on every
    # 5.x release to the newest (shims for the changes within 5.x: integrations/_compat.py). No upper
    # bound of ours. CI tests both ends it can: the transformers kvpress pins (`make test`) and the
    # newest release without kvpress (`make test-latest`).
    "transformers": ["transformers>=5.0", "gguf>=0.10", "accelerate"],
    # kvpress itself pins transformers (0.5.5: >=4.56,<5.3), and pip applies its pin when it is installed.
    "kvpress": ["kvpress>=0.5", "transformers>=5.0"],
    "flash-attn": ["flash-attn"],
    "bench": ["matplotlib", "tqdm"],
    "test": ["pytest", "hypothesis", "numpy"],
}
extras["all"] = sorted({d for k, v in extras.items() if k != "flash-attn" for d in v})

setup(
    name="kvpress-kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for KV-cache compression in a paged KV cache",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["kvpress_kernels", "kvpress_kernels.*"]),
    install_requires=["torch>=2.4", "triton>=3.0; platform_system=='Linux'", "numpy", "tqdm"],
    extras_require=extras,
    entry_points={"console_scripts": ["kvpress-kernels=kvpress_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

"""The CUDA C++ backend compiles wherever a toolkit is (CI has CUDA 13.0 but no GPU), and says why
it cannot run when it cannot."""
import shutil

import pytest
import torch

import fastkd
from fastkd import _cuda_build


@pytest.mark.skipif(shutil.which("nvcc") is None and not _cuda_build.os.environ.get("CUDA_HOME"),
                    reason="no CUDA toolkit on this machine")
def test_extension_compiles_and_exposes_the_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a fresh build, not a cached one
    _cuda_build.load.cache_clear()
    ext = _cuda_build.load()
    assert callable(ext.kd_forward) and callable(ext.scale_grad)
    assert (_cuda_build.Path(_cuda_build.os.environ["CUDA_HOME"]) / "bin").is_dir()


def test_toolkit_root_comes_from_nvcc_not_its_folder(monkeypatch):
    """nvcc as a wrapper script in /usr/local/bin must not make /usr/local the toolkit."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    root = _cuda_build.toolkit_root()
    if root is None:
        pytest.skip("no nvcc")
    libs = list(_cuda_build.Path(root).glob("lib*/libcudart*")) + \
        list(_cuda_build.Path(root).glob("targets/*/lib/libcudart*"))
    assert libs, f"{root} holds no libcudart"


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(ValueError, match="backend='cuda' cannot run: .*CUDA tensors"):
        fastkd.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), backend="cuda")
    info = {b.name: b for b in fastkd.available_backends("cpu")}
    assert not info["cuda"].available and "CUDA tensors" in info["cuda"].reason

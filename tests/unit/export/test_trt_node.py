"""The node facts engines are checked against (`export.node.facts`): the GPU CUDA will use, and the TensorRT Triton
loads plans with, read the way the NGC image exposes it; with fake nvidia-smi output and fake libraries."""

from __future__ import annotations

import subprocess
import types

import pytest

from export.node import facts as node_mod
from export.node.facts import (
    decode_infer_lib_version,
    parse_ldd,
    probe_node,
    same_version,
    triton_tensorrt,
    visible_gpus,
)

SMI_ROWS = ("0, GPU-1111aaaa, NVIDIA A100-SXM4-80GB, 8.0, 570.124.06\n"
            "1, GPU-2222bbbb, NVIDIA H100 80GB HBM3, 9.0, 570.124.06\n")


def _fake_smi(monkeypatch, rows: str = SMI_ROWS) -> None:
    real_run = subprocess.run

    def fake_run(cmd, **kwargs):
        if not cmd[0].endswith("nvidia-smi"):
            return real_run(cmd, **kwargs)
        text = rows if any(a.startswith("--query-gpu=") for a in cmd) else \
            "| NVIDIA-SMI 570.124.06   Driver Version: 570.124.06   CUDA Version: 12.8 |\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=text, stderr="")

    monkeypatch.setattr(node_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(node_mod.subprocess, "run", fake_run)
    monkeypatch.setattr(node_mod, "cuda_runtime_version", lambda: None)
    monkeypatch.setattr(node_mod, "locate_triton", lambda: None)
    monkeypatch.setattr(node_mod, "builder_tensorrt_version", lambda: None)


def test_probe_without_nvidia_smi_reports_no_gpu(monkeypatch):
    monkeypatch.setattr(node_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(node_mod, "cuda_runtime_version", lambda: None)
    node = probe_node(tensorrt_version="10.13.3.9", env={})
    assert not node.has_gpu and node.tensorrt_version == "10.13.3.9"
    assert any("nvidia-smi not found" in n for n in node.notes)


def test_probe_parses_nvidia_smi(monkeypatch):
    _fake_smi(monkeypatch)
    node = probe_node(env={})
    assert (node.gpu_name, node.compute_capability, node.driver_version, node.cuda_version) == \
        ("NVIDIA A100-SXM4-80GB", "8.0", "570.124.06", "12.8")
    assert node.tensorrt_version is None
    assert any("more than one model" in n for n in node.notes) and any("--tensorrt-version" in n for n in node.notes)
    assert any("no tritonserver found" in n for n in node.notes)


@pytest.mark.parametrize("visible, expected", [("1", "NVIDIA H100 80GB HBM3"), ("GPU-2222", "NVIDIA H100 80GB HBM3"),
                                               ("1,0", "NVIDIA H100 80GB HBM3"), ("0", "NVIDIA A100-SXM4-80GB")])
def test_probe_checks_the_gpu_cuda_uses(monkeypatch, visible, expected):
    _fake_smi(monkeypatch)
    node = probe_node(env={"CUDA_VISIBLE_DEVICES": visible})
    assert node.gpu_name == expected
    assert any("more than one model" in n for n in node.notes) == ("," in visible)


@pytest.mark.parametrize("visible", ["", "7", "-1", "NoDevFiles"])
def test_cuda_visible_devices_can_hide_every_gpu(monkeypatch, visible):
    _fake_smi(monkeypatch)
    node = probe_node(env={"CUDA_VISIBLE_DEVICES": visible})
    assert not node.has_gpu and any("makes no GPU visible" in n for n in node.notes)


def test_cuda_stops_reading_the_list_at_the_first_unknown_entry():
    rows = [{"index": "0", "uuid": "GPU-a"}, {"index": "1", "uuid": "GPU-b"}]
    assert visible_gpus(rows, "1,9,0")[0] == [rows[1]]
    assert visible_gpus(rows, None)[0] == rows


def test_cuda_runtime_version_comes_from_the_one_cuda_python_loader(monkeypatch):
    from export.node import cuda_memory

    fake = types.SimpleNamespace(cudaRuntimeGetVersion=lambda: (0, 12080))
    monkeypatch.setattr(cuda_memory, "cudart", lambda: fake)
    _fake_smi(monkeypatch)
    monkeypatch.setattr(node_mod, "cuda_runtime_version", cuda_memory.cuda_runtime_version)
    assert probe_node(env={}).cuda_version == "12.8"


def _lib(**functions):
    return types.SimpleNamespace(**{name: (lambda v=v: v) for name, v in functions.items()})


def test_libnvinfer_version_is_decoded_for_each_release_line():
    assert decode_infer_lib_version(_lib(getInferLibMajorVersion=10, getInferLibMinorVersion=13,
                                         getInferLibPatchVersion=3, getInferLibBuildVersion=9,
                                         getInferLibVersion=101303)) == "10.13.3.9"
    assert decode_infer_lib_version(_lib(getInferLibVersion=101303)) == "10.13.3"  # 10.x: major * 10000
    assert decode_infer_lib_version(_lib(getInferLibVersion=8601)) == "8.6.1"  # 8.x: major * 1000
    assert decode_infer_lib_version(_lib()) is None


def test_ldd_output_gives_the_library_triton_loads():
    text = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
            "\tlibnvinfer.so.10 => /usr/lib/x86_64-linux-gnu/libnvinfer.so.10 (0x00007f3a)\n"
            "\tlibnvinfer_plugin.so.10 => not found\n")
    assert str(parse_ldd(text, "libnvinfer.so")) == "/usr/lib/x86_64-linux-gnu/libnvinfer.so.10"
    assert parse_ldd(text, "libnvinfer_plugin.so") is None
    assert parse_ldd("", "libnvinfer.so") is None


@pytest.fixture
def ngc_backends(tmp_path, monkeypatch, fake_trt):
    """A backend folder like the NGC image's: tensorrt and python backends, libnvinfer 10.13.3 (file name only)."""
    for name in ("tensorrt", "python"):
        (tmp_path / "backends" / name).mkdir(parents=True)
        (tmp_path / "backends" / name / f"libtriton_{name}.so").write_bytes(b"")
    lib = tmp_path / "lib" / "libnvinfer.so.10.13.3"
    lib.parent.mkdir()
    lib.write_bytes(b"not a real library")
    monkeypatch.setattr(node_mod, "linked_library", lambda binary, soname: lib)
    fake_trt.__version__ = "10.99.0.1"  # a different builder package must not be taken for Triton's TensorRT
    return tmp_path / "backends"


def test_triton_tensorrt_is_read_from_its_backend_and_the_image(ngc_backends):
    runtime = triton_tensorrt(ngc_backends, env={"TRT_VERSION": "10.13.3.9"})
    assert runtime.version == "10.13.3.9" and "libnvinfer.so.10.13.3" in runtime.source
    assert triton_tensorrt(ngc_backends, env={}).version == "10.13.3"  # no build number, still not a mismatch
    other = triton_tensorrt(ngc_backends, env={"TRT_VERSION": "10.14.1.48"})
    assert other.version == "10.13.3" and "$TRT_VERSION says 10.14.1.48" in other.notes[0]


def test_a_triton_without_tensorrt_backend_has_no_tensorrt(tmp_path, fake_trt):
    (tmp_path / "python").mkdir()
    (tmp_path / "python" / "libtriton_python.so").write_bytes(b"")
    runtime = triton_tensorrt(tmp_path, env={"TRT_VERSION": "10.13.3.9"})
    assert runtime.version is None and "no TensorRT backend (backends in" in runtime.notes[0]
    assert "python" in runtime.notes[0]


def test_probe_reports_builder_and_triton_tensorrt_apart(monkeypatch, ngc_backends):
    _fake_smi(monkeypatch)
    monkeypatch.setattr(node_mod, "locate_triton", lambda: types.SimpleNamespace(backend_dir=ngc_backends))
    monkeypatch.setattr(node_mod, "builder_tensorrt_version", lambda: "10.99.0.1")
    node = probe_node(env={"TRT_VERSION": "10.13.3.9"})
    assert node.tensorrt_version == "10.13.3.9"
    assert any("tensorrt Python package here is 10.99.0.1" in n for n in node.notes)


def test_versions_without_a_build_number_match_on_the_rest():
    assert same_version("10.13.3.9", "10.13.3") and same_version("10.13.3.9", "10.13.3.9.post1")
    assert not same_version("10.13.3.9", "10.13.2") and not same_version("10.13.3.9", "10.13.3.8")
    assert not same_version("10.13", "10.13.3.9")  # too little to tell


def test_library_version_reads_the_functions_in_a_child_process(tmp_path):
    import shutil as sh

    from export.node.facts import library_version

    compiler = sh.which("cc") or sh.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in libnvinfer")
    source = tmp_path / "nvinfer.c"
    source.write_text("int getInferLibMajorVersion(void){return 10;} int getInferLibMinorVersion(void){return 13;}\n"
                      "int getInferLibPatchVersion(void){return 3;} int getInferLibBuildVersion(void){return 9;}\n")
    lib = tmp_path / "libnvinfer.so.10.13.3"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(source)], check=True, timeout=60)
    assert library_version(lib) == "10.13.3.9"
    (tmp_path / "libnvinfer.so.10.13.4").write_bytes(b"not loadable")
    assert library_version(tmp_path / "libnvinfer.so.10.13.4") == "10.13.4"  # from the file name

"""TensorRT optimisation profiles derived from the spec (valid, complete, in line with the rendered configs), and
the engine builder and runner wired to them (against a fake TensorRT; the real one runs in test_gpu.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from export.profiles import (
    OptimizationProfile,
    ProfileError,
    ShapeRange,
    coverage_gaps,
    engine_models,
    find_profile,
    model_profiles,
    producible_shapes,
    validate_profiles,
)
from fusionrank.serving.render import model_configs
from fusionrank.spec import BatchingSpec
from fusionrank.tensors import model_io


def _per_bucket(spec):
    return spec.with_overrides(export=dataclasses.replace(
        spec.export, tensorrt=dataclasses.replace(spec.export.tensorrt, profile_per_bucket=True)))


@pytest.fixture(params=["single", "per_bucket"])
def spec(request, ci_spec):
    return ci_spec if request.param == "single" else _per_bucket(ci_spec)


def test_engine_models_follow_enabled_modalities(ci_spec):
    assert engine_models(ci_spec) == ("text_encoder", "image_encoder", "audio_encoder", "fusion_ranker")
    no_audio = ci_spec.with_overrides(modalities=dataclasses.replace(
        ci_spec.modalities, audio=dataclasses.replace(ci_spec.modalities.audio, enabled=False)))
    assert engine_models(no_audio) == ("text_encoder", "image_encoder", "fusion_ranker")


def test_every_producible_shape_is_inside_a_profile(spec):
    for model in engine_models(spec):
        shapes = list(producible_shapes(spec, model))
        assert len(shapes) >= spec.serving.batching(model).max_batch_size
        assert coverage_gaps(spec, model) == [], model


def test_min_opt_max_hold_in_every_dim(spec):
    for model in engine_models(spec):
        for profile in model_profiles(spec, model):
            for name, r in profile.inputs:
                assert all(lo <= o <= hi for lo, o, hi in zip(r.min, r.opt, r.max)), (model, name)


def test_batch_range_matches_rendered_gpu_config(spec):
    configs = model_configs(spec)
    for model in engine_models(spec):
        gpu = configs[model]["gpu"]
        preferred = max(gpu.dynamic_batching.preferred_batch_size)
        for profile in model_profiles(spec, model):
            for name, r in profile.inputs:
                assert (r.min[0], r.opt[0], r.max[0]) == (1, preferred, gpu.max_batch_size), (model, name)


def test_profile_inputs_match_the_tensor_contract(spec):
    for model in engine_models(spec):
        io_ = model_io(spec, model)
        for profile in model_profiles(spec, model):
            ranges = profile.ranges()
            assert list(ranges) == [t.name for t in io_.inputs]
            for t in io_.inputs:
                assert len(ranges[t.name].min) == len(t.dims) + 1
                fixed = [(i, d) for i, d in enumerate(t.dims) if d != -1]
                assert all(ranges[t.name].min[i + 1] == ranges[t.name].max[i + 1] == d for i, d in fixed)


def test_single_text_profile_spans_the_buckets(ci_spec):
    (profile,) = model_profiles(ci_spec, "text_encoder")
    buckets = ci_spec.modalities.text.buckets
    ids = profile.ranges()["input_ids"]
    assert ids.min[1] == buckets[0]
    assert ids.max[1] == ci_spec.modalities.text.max_length
    assert ids.opt[1] == buckets[len(buckets) // 2]
    assert profile.ranges()["attention_mask"] == ids


def test_profile_per_bucket_gives_each_bucket_its_own_tuned_profile(ci_spec):
    spec = _per_bucket(ci_spec)
    profiles = model_profiles(spec, "text_encoder")
    buckets = spec.modalities.text.buckets
    assert len(profiles) == len(buckets)
    max_batch = spec.serving.batching("text_encoder").max_batch_size
    for bucket in buckets:
        shapes = {"input_ids": (7, bucket), "attention_mask": (7, bucket)}
        index = find_profile(profiles, shapes)
        assert index is not None
        assert profiles[index].ranges()["input_ids"].opt[1] == bucket
        assert profiles[index].ranges()["input_ids"].max == (max_batch, bucket)
    # Non-text models keep one profile.
    assert len(model_profiles(spec, "image_encoder")) == 1


def test_profiles_follow_a_larger_max_batch(ci_spec):
    models = dict(ci_spec.serving.models)
    models["image_encoder"] = BatchingSpec(max_batch_size=256, preferred_batch_sizes=(64, 192))
    spec = ci_spec.with_overrides(serving=dataclasses.replace(ci_spec.serving, models=models))
    (profile,) = model_profiles(spec, "image_encoder")
    r = profile.ranges()["pixel_values"]
    assert (r.min[0], r.opt[0], r.max[0]) == (1, 192, 256)
    assert model_configs(spec)["image_encoder"]["gpu"].max_batch_size == 256


def test_a_profile_missing_the_largest_bucket_is_caught(ci_spec):
    (profile,) = model_profiles(ci_spec, "text_encoder")
    second_largest = ci_spec.modalities.text.buckets[-2]
    short = OptimizationProfile("short", tuple(
        (name, ShapeRange(r.min, r.opt, (r.max[0], second_largest))) for name, r in profile.inputs))
    gaps = coverage_gaps(ci_spec, "text_encoder", (short,))
    assert gaps and all(s["input_ids"][1] == ci_spec.modalities.text.max_length for s in gaps)
    with pytest.raises(ProfileError, match="fall outside every optimisation profile"):
        validate_profiles(ci_spec, "text_encoder", (short,))


def test_a_profile_below_max_batch_is_caught(ci_spec):
    (profile,) = model_profiles(ci_spec, "fusion_ranker")
    small = OptimizationProfile("small", tuple((n, ShapeRange(r.min, (8, *r.opt[1:]), (8, *r.max[1:])))
                                               for n, r in profile.inputs))
    gaps = coverage_gaps(ci_spec, "fusion_ranker", (small,))
    assert min(s["history"][0] for s in gaps) == 9


@pytest.mark.parametrize("lo, opt, hi", [((1, 16), (4, 8), (8, 64)),    # opt below min in dim 1
                                         ((1, 16), (9, 32), (8, 64)),    # opt above max in dim 0
                                         ((0, 16), (1, 16), (8, 16)),    # zero dim
                                         ((1,), (1, 16), (8, 16))])      # rank mismatch
def test_shape_range_rejects_invalid_ranges(lo, opt, hi):
    with pytest.raises(ProfileError):
        ShapeRange(lo, opt, hi)


def test_shape_range_round_trips_through_dict():
    r = ShapeRange((1, 16), (32, 32), (64, 64))
    assert ShapeRange.from_dict(r.as_dict()) == r
    assert r.contains((64, 16)) and not r.contains((65, 16)) and not r.contains((1, 15))


def test_profiles_agree_with_the_exported_onnx_inputs(ci_spec, built_repository):
    import onnx

    for model in engine_models(ci_spec):
        graph = onnx.load(str(built_repository / model / "1" / "model.onnx"), load_external_data=False).graph
        onnx_inputs = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in graph.input}
        for profile in model_profiles(ci_spec, model):
            assert set(profile.ranges()) == set(onnx_inputs), model
            for name, r in profile.inputs:
                dims = onnx_inputs[name]
                assert len(dims) == len(r.min), (model, name)
                for i, d in enumerate(dims):
                    if d is not None:  # a static ONNX dim must be exactly what the profile allows
                        assert r.min[i] == r.max[i] == d, (model, name, i)


# --- the builder and the engine runner against a fake `tensorrt` / cuda-python --------------------------------------
# TensorRT needs a GPU, so these fakes stand in for the documented API surface (names checked against the
# tensorrt_cu12_bindings 10.13.3.9 wheel): they record what onnx2trt asks for, so the wiring of profiles, precision,
# timing cache, error reporting and the runner's profile choice and chunking is tested here; test_gpu.py runs the real
# thing on a GPU node.


class _FakeTRT:
    __version__ = "10.13.3.9"

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16, INT8, VERSION_COMPATIBLE = "FP16", "INT8", "VERSION_COMPATIBLE"

    class HardwareCompatibilityLevel:
        AMPERE_PLUS = "AMPERE_PLUS"

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    int64, float32 = "int64", "float32"
    builds: list = []

    @staticmethod
    def nptype(dtype):
        return np.dtype(dtype).type


class _Tensor:
    def __init__(self, name):
        self.name = name


class _Network:
    def __init__(self):
        self.inputs = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class _ParserError:
    def code(self):
        return "UNSUPPORTED_NODE"

    def node(self):
        return 7

    def desc(self):
        return "no importer for op FancyOp"

    def file(self):
        return "onnxOpImporters.cpp"

    def line(self):
        return 42

    def func(self):
        return "importFancyOp"


class _Parser:
    def __init__(self, network, logger):
        self.network, self.logger, self.num_errors = network, logger, 0

    def parse_from_file(self, path):
        blob = Path(path).read_bytes()
        if blob == b"BROKEN":
            self.num_errors = 1
            self.logger.log(_FakeTRT.ILogger.Severity.ERROR, "ModelImporter: failed to import node 7")
            return False
        if blob.startswith(b"["):  # a stand-in file listing the input names
            names = json.loads(blob)
        else:  # a real exported model
            import onnx

            names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        self.network.inputs = [_Tensor(n) for n in names]
        return True

    def get_error(self, i):
        return _ParserError()


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Cache:
    def __init__(self, blob):
        self.blob = bytes(blob)

    def serialize(self):
        return self.blob + b"+timings"


class _Config:
    def __init__(self):
        self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None
        self.builder_optimization_level = None
        self.hardware_compatibility_level = None

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return _Cache(blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def set_calibration_profile(self, profile):
        self.calibration_profile = profile


class _Builder:
    fail = False

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        _FakeTRT.builds.append(config)
        if "INT8" in config.flags:  # TensorRT pulls calibration batches until the calibrator returns None
            names = list(config.calibration_profile.shapes)
            config.calibrated = []
            while (pointers := config.int8_calibrator.get_batch(names)) is not None:
                config.calibrated.append(pointers)
        if _Builder.fail:
            self.logger.log(_FakeTRT.ILogger.Severity.ERROR, "Skipping tactic: out of memory")
            return None
        return b"PLAN:" + ",".join(sorted(config.flags)).encode()


_FakeTRT.Builder, _FakeTRT.OnnxParser = _Builder, _Parser


@pytest.fixture
def fake_trt(monkeypatch):
    import sys
    import types

    module = types.ModuleType("tensorrt")
    for name in dir(_FakeTRT):
        if not name.startswith("__") or name == "__version__":
            setattr(module, name, getattr(_FakeTRT, name))
    _FakeTRT.builds.clear()
    _Builder.fail = False
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


def _onnx_repo(spec, root, broken: str | None = None):
    repo = root / "repo"
    for model in engine_models(spec):
        (repo / model / "1").mkdir(parents=True)
        names = [t.name for t in model_io(spec, model).inputs]
        (repo / model / "1" / "model.onnx").write_text("BROKEN" if model == broken else json.dumps(names))
    return repo


def _probe():
    from export.manifest import NodeInfo

    return NodeInfo(gpu_name="Fake GPU X1", compute_capability="9.0", driver_version="570.1", cuda_version="12.8")


def test_builder_gets_the_spec_profiles_precision_and_limits(ci_spec, tmp_path, fake_trt):
    from export.manifest import find_manifest
    from export.onnx2trt import build_engines
    from export.preflight import preflight

    spec = _per_bucket(ci_spec)
    repo = _onnx_repo(spec, tmp_path)
    timing = tmp_path / "cache" / "timing.cache"
    results = build_engines(spec, repo, timing_cache=timing, probe=_probe)
    assert [r.model for r in results] == list(engine_models(spec))
    configs = dict(zip(engine_models(spec), _FakeTRT.builds))
    for model, config in configs.items():
        expected = [{n: (r.min, r.opt, r.max) for n, r in p.inputs} for p in model_profiles(spec, model)]
        assert [p.shapes for p in config.profiles] == expected, model
        assert config.flags == {"FP16"}
        assert config.pool == {"WORKSPACE": spec.export.tensorrt.workspace_mib << 20}
        assert config.builder_optimization_level == spec.export.tensorrt.builder_optimization_level
        assert config.hardware_compatibility_level is None
        assert (repo / model / "1" / "model.plan").read_bytes() == b"PLAN:FP16"
        manifest = find_manifest(repo, model)
        assert manifest.tensorrt_version == "10.13.3.9" and manifest.gpu_name == "Fake GPU X1"
    assert len(configs["text_encoder"].profiles) == len(spec.modalities.text.buckets)
    # The timing cache is written and fed to the next build (it grows with each one).
    assert timing.read_bytes() == b"+timings" * len(configs)
    assert configs["image_encoder"].cache.blob == b"+timings"
    # What was just built passes pre-flight on the node that built it.
    from export.manifest import NodeInfo

    node = NodeInfo(**{**_probe().as_dict(), "notes": (), "tensorrt_version": "10.13.3.9"})
    assert preflight(spec, repo, probe=lambda: node) == []


def test_builder_flags_for_fp32_and_compatibility(ci_spec, tmp_path, fake_trt):
    from export.manifest import find_manifest
    from export.onnx2trt import build_engines

    trt = dataclasses.replace(ci_spec.export.tensorrt, hardware_compatible=True, version_compatible=True)
    spec = ci_spec.with_overrides(export=dataclasses.replace(ci_spec.export, tensorrt=trt))
    repo = _onnx_repo(spec, tmp_path)
    build_engines(spec, repo, precision="fp32", models=["fusion_ranker"], probe=_probe,
                  timing_cache=tmp_path / "t.cache")
    (config,) = _FakeTRT.builds
    assert config.flags == {"VERSION_COMPATIBLE"}
    assert config.hardware_compatibility_level == "AMPERE_PLUS"
    flags = find_manifest(repo, "fusion_ranker").build_flags
    assert flags["precision"] == "fp32" and flags["hardware_compatibility_level"] == "ampere_plus"
    assert flags["version_compatible"] is True


def test_parser_and_builder_errors_are_reported_in_full(ci_spec, tmp_path, fake_trt):
    from export.onnx2trt import EngineBuildError, build_engines

    repo = _onnx_repo(ci_spec, tmp_path, broken="audio_encoder")
    with pytest.raises(EngineBuildError) as err:
        build_engines(ci_spec, repo, models=["audio_encoder"], probe=_probe, timing_cache=tmp_path / "t")
    text = str(err.value)
    assert "could not parse" in text and "node 7: no importer for op FancyOp" in text
    assert "onnxOpImporters.cpp:42 importFancyOp" in text and "failed to import node 7" in text

    _Builder.fail = True
    with pytest.raises(EngineBuildError, match="failed to build the engine:\n  Skipping tactic: out of memory"):
        build_engines(ci_spec, repo, models=["image_encoder"], probe=_probe, timing_cache=tmp_path / "t")
    assert not (repo / "image_encoder" / "1" / "model.plan").exists()


def test_onnx_inputs_must_match_the_contract(ci_spec, tmp_path, fake_trt):
    from export.onnx2trt import EngineBuildError, build_engines

    repo = _onnx_repo(ci_spec, tmp_path)
    (repo / "text_encoder" / "1" / "model.onnx").write_text(json.dumps(["input.1", "attention_mask"]))
    with pytest.raises(EngineBuildError, match="input.1"):
        build_engines(ci_spec, repo, models=["text_encoder"], probe=_probe, timing_cache=tmp_path / "t")


def test_no_gpu_no_build(ci_spec, tmp_path, fake_trt):
    from export.manifest import NodeInfo
    from export.onnx2trt import EngineBuildError, build_engines

    with pytest.raises(EngineBuildError, match="no GPU on this node"):
        build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), probe=lambda: NodeInfo(notes=("nvidia-smi not found",)))


class _FakeCudart:
    """cuda-python's runtime module over host memory: enough for the runner's malloc/memcpy/stream calls."""

    memory: dict[int, bytearray] = {}
    allocations = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    @classmethod
    def cudaMalloc(cls, n):
        cls.allocations += 1
        ptr = 0x1000 * cls.allocations
        cls.memory[ptr] = bytearray(n)
        return 0, ptr

    @classmethod
    def cudaFree(cls, ptr):
        cls.memory.pop(ptr)
        return (0,)

    @classmethod
    def cudaMemcpy(cls, dst, src, n, kind):
        import ctypes

        if kind == cls.cudaMemcpyKind.cudaMemcpyHostToDevice:
            cls.memory[dst][:n] = ctypes.string_at(src, n)
        else:
            ctypes.memmove(dst, bytes(cls.memory[src][:n]), n)
        return (0,)

    @staticmethod
    def cudaStreamCreate():
        return 0, 99

    @staticmethod
    def cudaStreamSynchronize(stream):
        return (0,)

    @staticmethod
    def cudaStreamDestroy(stream):
        return (0,)


class _FakeEngine:
    """A text encoder engine with the spec's per-bucket profiles; output row = sum of input_ids, profile index."""

    def __init__(self, profiles):
        self.profiles = profiles
        self.num_optimization_profiles = len(profiles)
        self.names = ["input_ids", "attention_mask", "text_embedding"]
        self.num_io_tensors = 3

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "OUTPUT" if name == "text_embedding" else "INPUT"

    def get_tensor_dtype(self, name):
        return "float32" if name == "text_embedding" else "int64"

    def get_tensor_profile_shape(self, name, index):
        r = self.profiles[index].ranges()[name]
        return [r.min, r.opt, r.max]

    def create_execution_context(self):
        return _FakeContext(self)


class _FakeContext:
    calls: list = []

    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        r = self.engine.profiles[self.profile].ranges()[name]
        assert r.contains(tuple(shape)), f"{name} {shape} outside profile {self.profile}"
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        return (self.shapes["input_ids"][0], 2)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        rows, seq = self.shapes["input_ids"]
        ids = np.frombuffer(bytes(_FakeCudart.memory[self.addresses["input_ids"]][:rows * seq * 8]), np.int64)
        out = np.stack([ids.reshape(rows, seq).sum(1), np.full(rows, self.profile)], 1).astype(np.float32)
        _FakeCudart.memory[self.addresses["text_embedding"]][:out.nbytes] = out.tobytes()
        _FakeContext.calls.append((self.profile, rows, seq))
        return True


class _FakeRuntime:
    def __init__(self, logger):
        self.logger, self.engine_host_code_allowed = logger, False

    def deserialize_cuda_engine(self, blob):
        if blob == b"GARBAGE":
            self.logger.log(_FakeTRT.ILogger.Severity.ERROR, "Serialization assertion magicTagRead failed")
            return None
        return _FakeEngine(_FakeRuntime.profiles)


@pytest.fixture
def fake_runtime(fake_trt, monkeypatch, ci_spec):
    import sys
    import types

    fake_trt.Runtime = _FakeRuntime
    _FakeRuntime.profiles = model_profiles(_per_bucket(ci_spec), "text_encoder")
    _FakeContext.calls = []
    _FakeCudart.memory = {}
    cuda, bindings, runtime = (types.ModuleType(n) for n in ("cuda", "cuda.bindings", "cuda.bindings.runtime"))
    for name in ("cudaMemcpyKind", "cudaMalloc", "cudaFree", "cudaMemcpy", "cudaStreamCreate",
                 "cudaStreamSynchronize", "cudaStreamDestroy"):
        setattr(runtime, name, getattr(_FakeCudart, name))
    bindings.runtime, cuda.bindings = runtime, bindings
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    return _FakeRuntime


def test_runner_picks_the_bucket_profile_and_splits_over_max_batch(ci_spec, tmp_path, fake_runtime):
    from export.onnx2trt import EngineBuildError, TensorRTRunner

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"PLAN")
    runner = TensorRTRunner(plan)
    rng = np.random.default_rng(0)
    buckets = ci_spec.modalities.text.buckets
    max_batch = ci_spec.serving.batching("text_encoder").max_batch_size
    for index, bucket in enumerate(buckets):
        ids = rng.integers(0, 1000, size=(2 * max_batch + 5, bucket))
        out = runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})["text_embedding"]
        np.testing.assert_array_equal(out[:, 0], ids.sum(1).astype(np.float32))
        assert set(out[:, 1]) == {index}  # the profile tuned for this bucket
    assert [c[1] for c in _FakeContext.calls[:3]] == [max_batch, max_batch, 5]
    with pytest.raises(EngineBuildError, match="fit no optimisation profile"):
        runner.run({"input_ids": np.ones((2, buckets[-1] + 1), np.int64),
                    "attention_mask": np.ones((2, buckets[-1] + 1), np.int64)})
    runner.close()
    assert _FakeCudart.memory == {}  # every device buffer freed


def test_runner_reports_why_a_plan_does_not_load(tmp_path, fake_runtime):
    from export.onnx2trt import EngineBuildError, TensorRTRunner

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"GARBAGE")
    with pytest.raises(EngineBuildError, match="magicTagRead failed"):
        TensorRTRunner(plan)


def test_a_timing_cache_from_another_node_is_replaced(ci_spec, tmp_path, fake_trt, monkeypatch):
    from export.onnx2trt import build_engines

    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"from-another-gpu")
    monkeypatch.setattr(_Config, "set_timing_cache", lambda self, cache, ignore_mismatch: (
        setattr(self, "cache", cache) or not cache.blob.startswith(b"from-another")))
    build_engines(ci_spec, _onnx_repo(ci_spec, tmp_path), models=["audio_encoder"], probe=_probe,
                  timing_cache=timing)
    assert timing.read_bytes() == b"+timings"


def test_int8_build_calibrates_on_catalogue_samples(ci_spec, built_repository, tmp_path, fake_runtime):
    import shutil

    from export.onnx2trt import build_engines

    repo = tmp_path / "repo"
    for part in ("text_encoder/1/model.onnx", "preprocess/1/tokenizer"):
        copy = shutil.copytree if (built_repository / part).is_dir() else shutil.copy
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        copy(built_repository / part, repo / part)
    (result,) = build_engines(ci_spec, repo, precision="int8", models=["text_encoder"], probe=_probe,
                              timing_cache=tmp_path / "trt" / "timing.cache")
    (config,) = _FakeTRT.builds
    assert config.flags == {"INT8", "FP16"} and result.precision == "int8"
    batch = ci_spec.serving.batching("text_encoder").preferred_batch_sizes[-1]
    shape = (batch, ci_spec.modalities.text.max_length)  # padded to max_length: every title fits, none is cut
    assert config.calibration_profile.shapes == {"input_ids": (shape, shape, shape),
                                                 "attention_mask": (shape, shape, shape)}
    assert len(config.calibrated) == -(-ci_spec.export.tensorrt.calibration_samples // batch)
    assert all(len(pointers) == 2 and all(pointers) for pointers in config.calibrated)
    assert _FakeCudart.memory == {}  # calibration buffers freed after the build

"""The exported models (the encoders and the ranker): the CPU profile's Python class over ONNX Runtime, and each
profile's config (gpu: a TensorRT plan; cpu: that class on the graph `export.cpu` chose; onnx_gpu: Triton's
onnxruntime backend)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fusionrank.contract.errors import FusionRankError, PreprocessError
from fusionrank.contract.names import ENCODERS_AND_RANKER, RANKER, Modality, encoder_name
from fusionrank.contract.spec import PipelineSpec, ServingProfile, member_models
from fusionrank.contract.tensors import model_io
from fusionrank.request.validation import non_finite_row
from fusionrank.triton._batched import BatchedModel, lower_priority
from fusionrank.triton._config import (
    Configs,
    TritonUnit,
    add_instances,
    add_warmup,
    base_config,
    gpu_batching,
    python_config,
)

if TYPE_CHECKING:  # imported inside the config functions: keeps gRPC out of the Triton stubs
    from tritonclient.grpc import model_config_pb2 as mc


class OnnxRuntimeModel(BatchedModel):
    """Encoders and ranker in the CPU profile: one ONNX Runtime session over the graph `onnx_file` names."""

    def setup(self):
        import onnxruntime as ort

        # Encoders are batch work (only never-seen items reach them); the ranker, which every request needs, is not.
        self.background = self.params.get("background_priority") == "true"
        if self.background:
            lower_priority()  # before the session: ONNX Runtime's pool threads inherit it
        options = ort.SessionOptions()
        # The CPU memory arena only where the spec asks (`memory_arena`): it keeps the peak of the largest batch ever
        # run (the warm-up's) for the process's life, and pays only for graphs whose batches fault in many fresh
        # pages without it (docs/capacity.md, "The text encoder's fresh pages").
        options.enable_cpu_mem_arena = self.params.get("memory_arena") == "true"
        threads = int(self.params.get("intra_op_threads", "0"))
        if threads:
            options.intra_op_num_threads = threads
        path = self.version_dir / self.params.get("onnx_file", "model.onnx")
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: {path} not found; run `fusionrank export` first")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.dtypes = {i.name: np.int64 if "int64" in i.type else np.float32 for i in self.session.get_inputs()}

    def prepare(self, inputs):
        # Triton already checked names, dtypes and shapes against the config; only the ONNX dtypes are enforced.
        return {n: np.ascontiguousarray(a, dtype=self.dtypes[n]) for n, a in inputs.items()}

    def run(self, batch):
        if self.background:
            lower_priority()  # the thread running the batch, if not the one that set up (idempotent)
        values = self.session.run(self.output_names, batch)
        return dict(zip(self.output_names, values))

    def check(self, outputs):
        # The ranker's outputs are the reference ensemble's: no NaN or infinity may leave (a last guard; the GPU
        # profile's TensorRT ranker has none, the route checks in every profile).
        if self.params.get("check_finite_outputs") != "true":
            return
        for name, array in outputs.items():
            row = non_finite_row(array)
            if row is not None:
                self.logger.log_error(f"{self.name}: non-finite {name} at row {row} from finite inputs")
                raise PreprocessError(f"{name}[{row}]", f"{self.name} produced a non-finite value for candidate "
                                                        f"{row}; it cannot be scored")


def onnxruntime_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    """The CPU profile: `OnnxRuntimeModel` on the graph export.cpu chose (optimised FP32 or INT8 beside model.onnx,
    written by export/convert/onnx2cpu.py)."""
    config = python_config(spec, model, "onnxruntime")
    config.parameters["onnx_file"].string_value = spec.export.cpu.onnx_file(model)
    # One thread per session by default: the three encoders run concurrently in their own stubs, and several
    # threads each oversubscribe the cores (measured on 2 cores: a 10-candidate request 436 ms with the default,
    # 352 ms with 1); `fusionrank tune` measures other values per machine.
    batching = spec.serving.batching(model)
    config.parameters["intra_op_threads"].string_value = str(batching.intra_op_threads)
    if batching.concurrent_batches > 1:
        config.parameters["concurrent_batches"].string_value = str(batching.concurrent_batches)
    if batching.memory_arena:
        config.parameters["memory_arena"].string_value = "true"
    if model == RANKER:
        config.parameters["check_finite_outputs"].string_value = "true"
    else:
        config.parameters["background_priority"].string_value = "true"
    # Requests of different shapes (text rows of different padding buckets) may share an execute: the class runs
    # each shape's rows on their own (`BatchedModel._run_grouped`). Held apart by Triton 2.51's dynamic batcher, the
    # second of two such requests waited for the batcher's default wake-up, 500 ms, in a quarter to half of the
    # trials (docs/capacity.md, "A 500-ms stall").
    for entry in config.input:
        if -1 in entry.dims:
            entry.allow_ragged_batch = True
    return config


def engine_profile_count(spec: PipelineSpec, model: str) -> int:
    """How many optimisation profiles `model`'s engine has (export/profiles.py builds them): one per batch profile,
    times one per padding bucket for a text encoder built `profile_per_bucket`."""
    per_bucket = model == encoder_name(Modality.TEXT) and spec.export.tensorrt.profile_per_bucket
    return len(spec.serving.batch_profiles(model)) * (len(spec.modalities.text.buckets) if per_bucket else 1)


def cuda_graphs(config: mc.ModelConfig, spec: PipelineSpec) -> None:
    """CUDA graphs of a fixed-shape engine: one per batch profile's opt and max, each serving the batches from the
    previous graph's size + 1 up to its own (the TensorRT backend pads a batch up to the graph that holds it)."""
    model = config.name
    inputs = model_io(spec, model).inputs
    dynamic = [t.name for t in inputs if -1 in t.dims]
    if dynamic:
        raise FusionRankError(f"serving.gpu.{model}.cuda_graphs: {', '.join(dynamic)} has a dynamic axis; CUDA "
                              "graphs are for fixed-shape engines (set cuda_graphs: false)")
    cuda = config.optimization.cuda
    cuda.graphs = True
    sizes = sorted({b for _, opt, hi in spec.serving.batch_profiles(model) for b in (opt, hi)})
    for low, size in zip([0, *sizes], sizes):
        graph = cuda.graph_spec.add(batch_size=size)
        graph.graph_lower_bound.batch_size = low + 1
        for t in inputs:
            graph.input[t.name].dim.extend(t.dims)
            graph.graph_lower_bound.input[t.name].dim.extend(t.dims)


def tensorrt_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    config = base_config(spec, model)
    config.platform = "tensorrt_plan"
    config.default_model_filename = "model.plan"
    add_instances(config, spec, mc.ModelInstanceGroup.KIND_GPU)
    gpu_batching(config, spec)
    profiles = engine_profile_count(spec, model)
    if profiles > 1:
        # Several optimisation profiles (batch sizes, padding buckets): every instance must be allowed to use all of
        # them, else Triton binds only profile 0 and the other profiles' shapes are rejected.
        config.instance_group[0].profile.extend(str(i) for i in range(profiles))
    gpu = spec.serving.gpu_batching(model)
    if gpu is not None and gpu.cuda_graphs:
        cuda_graphs(config, spec)
    add_warmup(config, spec, tuple(opt for _, opt, _ in spec.serving.batch_profiles(model)))
    return config


def onnx_gpu_config(spec: PipelineSpec, model: str) -> mc.ModelConfig:
    from tritonclient.grpc import model_config_pb2 as mc  # here, not at the top: keeps gRPC out of the Triton stubs
    config = base_config(spec, model)
    config.platform = "onnxruntime_onnx"
    config.default_model_filename = "model.onnx"
    add_instances(config, spec, mc.ModelInstanceGroup.KIND_GPU)
    add_warmup(config, spec)
    return config


def configs(spec: PipelineSpec, model: str, rendered: Mapping[str, Configs]) -> Configs:
    return {ServingProfile.GPU: tensorrt_config(spec, model), ServingProfile.CPU: onnxruntime_config(spec, model),
            ServingProfile.ONNX_GPU: onnx_gpu_config(spec, model)}


def served_file(config: mc.ModelConfig) -> str:
    """The file a member's config serves from its version folder (a Python model's ONNX file, else the default)."""
    if config.backend == "python":
        return config.parameters["onnx_file"].string_value
    return config.default_model_filename


UNIT = TritonUnit(lambda spec: tuple(m for m in member_models(spec) if m in ENCODERS_AND_RANKER), configs, __name__,
                  OnnxRuntimeModel.__name__)

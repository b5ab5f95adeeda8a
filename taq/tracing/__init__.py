"""Activation tracing: device-side streaming statistics per (layer, timestep) and the FFN activation tracer."""

from taq.tracing.histogram import HistogramSpec, HistogramSpecError
from taq.tracing.stats import ActivationStats, BatchReduction, CellStats, compiled_reducer, reduce_batch
from taq.tracing.cuda_reduce import cuda_reduce_batch
from taq.tracing.tracer import FFNTracer, RecordingModule, device_reducer, mmdit_layer_paths, trace_ffn_activations

__all__ = ["ActivationStats", "BatchReduction", "CellStats", "HistogramSpec", "HistogramSpecError", "compiled_reducer",
           "reduce_batch", "cuda_reduce_batch", "FFNTracer", "RecordingModule", "device_reducer", "mmdit_layer_paths",
           "trace_ffn_activations"]

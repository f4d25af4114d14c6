"""``hf-streamlm plan``: will a recipe fit, how fast, how long and at what cost, from one optimizer step traced on
fake tensors (docs/plan.md)."""

from hf_streamlm.plan.engines import Layout, read_layout
from hf_streamlm.plan.gpus import GPUS, MFU_ANCHORS
from hf_streamlm.plan.planner import format_plan, make_plan, rank_memory
from hf_streamlm.plan.trace import StepSpec, Trace, trace_step

__all__ = ["GPUS", "MFU_ANCHORS", "Layout", "StepSpec", "Trace", "format_plan", "make_plan", "rank_memory",
           "read_layout", "trace_step"]

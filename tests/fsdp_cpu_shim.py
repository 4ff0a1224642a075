"""Runs a training script (`python tests/fsdp_cpu_shim.py SCRIPT ARGS...`, under `accelerate launch --config_file
examples/accelerate/fsdp_full_shard.yaml`) with accelerate's FSDP path enabled on CPU.

accelerate (1.16) sets `DistributedType.FSDP` only for accelerator devices: with CPU processes it silently trains
with DDP (`MULTI_CPU`) although torch's `fully_shard` works on CPU over gloo. The patch below makes, for CPU
processes launched with an FSDP config, the same assignment `AcceleratorState` makes on GPUs; everything else
(wrapping, sharded optimizer, full-state-dict saving) is accelerate's and transformers' own code. Test use only.
"""

import os
import runpy
import sys

import accelerate.state
import torch
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


_prepare = accelerate.Accelerator.prepare


def _prepare_and_report(self, *args, **kwargs):
    """`Accelerator.prepare`, then prints how each prepared model holds its parameters (tests/test_fsdp.py checks
    for DTensor shards on every rank)."""
    prepared = _prepare(self, *args, **kwargs)
    for obj in prepared if isinstance(prepared, (tuple, list)) else (prepared,):
        if isinstance(obj, torch.nn.Module):
            param = next(obj.parameters())
            local = param.to_local() if hasattr(param, "to_local") else param
            print(f"fsdp_cpu_shim: rank {self.process_index}: {self.distributed_type} {type(obj).__name__} "
                  f"{type(param).__name__} {tuple(local.shape)} of {tuple(param.shape)}", file=sys.stderr, flush=True)
    return prepared


if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    accelerate.state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    accelerate.Accelerator.prepare = _prepare_and_report

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")

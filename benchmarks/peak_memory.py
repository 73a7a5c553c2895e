"""Peak memory of one model step, measured in a fresh child process (this file run as a script).

The child builds the model and inputs, runs one warm-up step, frees the gradients
(zero_grad(set_to_none=True): a step's gradients count toward its peak), resets the kernel's
peak-RSS mark (write 5 to /proc/self/clear_refs, which resets VmHWM), reads VmRSS, runs the
measured step, then reports VmHWM - VmRSS-before: the peak resident-memory increase of one
steady-state step (SGD momentum buffers, allocated by the first step, are in the baseline). Large
CPU tensors are malloc'd with mmap and returned to the OS when freed, so RSS follows live tensor
memory; to keep it so, the child fixes glibc's mmap threshold at 128 KiB (MALLOC_MMAP_THRESHOLD_,
which also turns off its dynamic raising). The cold first step's increase (VmHWM minus RSS after
construction: includes momentum buffers and one-time library initialisation) is recorded too, as
cold_mb.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from maskrcnn.modeling.model import for_inference  # noqa: E402


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_measure(spec: dict) -> dict:
    """Runs in the child: peak RSS increase of one step (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    system, mode, size, backbone = spec["system"], spec["mode"], spec["size"], spec["backbone"]
    samples = bc.make_samples(size, spec.get("batch", 1), spec.get("instances", bc.TRAIN_INSTANCES))
    if system == "ours":
        model = bc.build_ours(backbone)
        infer, train = bc.infer_ours, bc.train_step_ours
    elif system == "ours_auto":  # inference as predict runs it (see bench_pair)
        model = for_inference(bc.build_ours(backbone))
        infer, train = (lambda m, s: bc.infer_ours(m, s, precision="auto")), None
    else:
        model = bc.build_torchvision(size)
        infer, train = bc.infer_torchvision, bc.train_step_torchvision
    optimizer = None
    if mode == "infer":
        model.eval()
        step = lambda: infer(model, samples)  # noqa: E731
    else:
        model.train()
        optimizer = bc.make_optimizer(model)
        step = lambda: train(model, optimizer, samples)  # noqa: E731

    def settle() -> None:  # gradients are part of a step's peak: free them before the baseline
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        gc.collect()

    settle()
    base_kb = _status_kb("VmRSS")
    step()  # cold step (also the warm-up)
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak across fork + exec.
    hwm = _status_kb("VmHWM")
    cold_kb = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - base_kb
    settle()
    out = {"cold_mb": cold_kb / 1024, "rss_before_mb": base_kb / 1024, "method": "cold step only"}
    if _reset_peak() and _status_kb("VmHWM") is not None:
        before = _status_kb("VmRSS")
        step()
        out["warm_mb"] = (_status_kb("VmHWM") - before) / 1024
        out["rss_before_warm_mb"] = before / 1024
        out["method"] = "VmHWM reset via clear_refs"
    return out


def measure_memory(system: str, mode: str, size: int, backbone: str = "resnet50") -> dict:
    spec = {"system": system, "mode": mode, "size": size, "backbone": backbone,
            "threads": torch.get_num_threads()}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        bc.log(f"memory child failed ({system} {mode} {size}): {proc.stderr.strip()[-500:]}")
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak(mem: dict) -> float | None:
    return mem.get("warm_mb", mem.get("cold_mb"))


if __name__ == "__main__":  # the child: SPEC is the JSON that measure_memory passes
    print(json.dumps(child_measure(json.loads(sys.argv[1]))))

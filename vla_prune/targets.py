"""Datasheet peaks of the GPUs a policy may run on: robot (Jetson) modules and datacenter parts.

One table serves `vla-prune info --target` (robot-GPU projection) and `vla_prune.roofline`
(which matches torch.cuda.get_device_name against `match` for its datasheet peaks).

Conventions, for every entry:
- `bf16_flops` is the *dense* (non-sparse) tensor-core FP16/BF16 rate, `int8_ops` the dense
  INT8 tensor rate. NVIDIA's headline figures for Jetson are sparse (2:4 structured sparsity,
  twice the dense rate) and for Orin they also add the DLAs to the GPU; both are undone here.
- `bandwidth` is the peak DRAM bandwidth printed on the datasheet.
- `source` names the document and the figures used, and says which numbers were derived and
  which could not be checked ("unverified"). Where a figure was checked, it was checked against
  a copy of the NVIDIA document or table quoted by a third party (the NVIDIA PDFs themselves were
  not reachable from here); the derivations are spelled out so anyone can redo them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str  # the name `--target` takes
    name: str
    bf16_flops: float  # dense tensor FP16/BF16 FLOP/s
    int8_ops: float  # dense tensor INT8 OP/s (listed; weight-only int8 still computes in bf16)
    bandwidth: float  # DRAM bytes/s
    memory_gb: float
    kind: str  # "robot" | "datacenter"
    source: str
    match: str | None = None  # fragment of torch.cuda.get_device_name (datacenter GPUs)


_ORIN_NOTE = (
    "dense INT8 = sparse / 2; dense FP16/BF16 = dense INT8 / 2 (Ampere tensor cores run FP16 at "
    "half their INT8 rate; derived, not printed on the data sheet)"
)

_TARGETS = (
    Target(
        "jetson-agx-orin-64gb",
        "Jetson AGX Orin 64GB",
        42.5e12,
        85e12,
        204.8e9,
        64,
        "robot",
        "NVIDIA Jetson AGX Orin Series Modules Data Sheet (DS-10662-001 v1.8), JAO 64GB: GPU "
        "2048 CUDA / 64 Tensor cores at 1.3 GHz, 170 sparse INT8 TOPS; 256-bit LPDDR5, 204.8 "
        "GB/s (checked). The 275 TOPS headline is sparse INT8 of GPU (170) + 2 DLA (105): not "
        f"used. {_ORIN_NOTE}: 85 TOPS INT8, 42.5 TFLOPS BF16.",
    ),
    Target(
        "jetson-agx-orin-32gb",
        "Jetson AGX Orin 32GB",
        27e12,
        54e12,
        204.8e9,
        32,
        "robot",
        "NVIDIA Jetson AGX Orin Series Modules Data Sheet (DS-10662-001 v1.8), JAO 32GB: GPU "
        "1792 CUDA / 56 Tensor cores at 939 MHz, 108 sparse INT8 TOPS; 256-bit LPDDR5, 204.8 "
        "GB/s (checked). The 200 TOPS headline is sparse INT8 of GPU + 2 DLA: not used. "
        f"{_ORIN_NOTE}: 54 TOPS INT8, 27 TFLOPS BF16.",
    ),
    Target(
        "jetson-orin-nx-16gb",
        "Jetson Orin NX 16GB",
        15e12,
        30e12,
        102e9,
        16,
        "robot",
        "NVIDIA Jetson Orin NX Series Modules Data Sheet (DS-10712-001): 100 sparse INT8 TOPS "
        "for the module, of which 2 NVDLA x 20 sparse TOPS; GPU 1024 CUDA / 32 Tensor cores at "
        "918 MHz; 128-bit LPDDR5, 102 GB/s (checked). GPU alone = 100 - 40 = 60 sparse TOPS "
        "(derived; the data sheet prints no GPU-only figure for the NX - unverified, though it "
        f"matches 32 cores x 918 MHz x 2048 sparse ops/clk as on AGX Orin). {_ORIN_NOTE}: 30 TOPS "
        "INT8, 15 TFLOPS BF16. Datasheet (non-Super) clocks.",
    ),
    Target(
        "jetson-thor",
        "Jetson AGX Thor (T5000)",
        258.5e12,
        517e12,
        273e9,
        128,
        "robot",
        "NVIDIA Jetson Thor product page / Jetson AGX Thor Developer Kit module table, T5000: "
        "2070 TFLOPS sparse FP4; 1035 TFLOPS dense FP4 | sparse FP8 | sparse INT8; 517 TFLOPS "
        "dense FP8 | sparse FP16; 2560-core Blackwell GPU, 96 Tensor cores, 1.57 GHz; 128 GB "
        "256-bit LPDDR5X, 273 GB/s (checked against copies of that table). The 2070 FP4 "
        "headline is sparse: not used. Dense BF16 = 517 / 2 = 258.5 TFLOPS and dense INT8 = "
        "1035 / 2 = 517 TOPS are derived (NVIDIA prints no dense BF16 figure: unverified; "
        "BF16 with FP32 accumulation may run slower).",
    ),
    Target(
        "h200",
        "NVIDIA H200 SXM",
        989e12,
        1979e12,
        4.8e12,
        141,
        "datacenter",
        "NVIDIA H200 Tensor Core GPU datasheet: BF16 1979 TFLOPS / INT8 3958 TOPS with sparsity "
        "(dense = half); 4.8 TB/s HBM3e (not re-checked here: unverified).",
        "H200",
    ),
    Target(
        "h100-pcie",
        "NVIDIA H100 PCIe",
        756e12,
        1513e12,
        2.0e12,
        80,
        "datacenter",
        "NVIDIA H100 Tensor Core GPU datasheet, PCIe: BF16 1513 TFLOPS / INT8 3026 TOPS with "
        "sparsity (dense = half); 2.0 TB/s HBM2e (not re-checked here: unverified).",
        "H100 PCIe",
    ),
    Target(
        "h100-sxm",
        "NVIDIA H100 SXM",
        989e12,
        1979e12,
        3.35e12,
        80,
        "datacenter",
        "NVIDIA H100 Tensor Core GPU datasheet, SXM: BF16 1979 TFLOPS / INT8 3958 TOPS with "
        "sparsity (dense = half); 3.35 TB/s HBM3 (not re-checked here: unverified).",
        "H100",
    ),
    Target(
        "a100-80gb",
        "NVIDIA A100 80GB SXM",
        312e12,
        624e12,
        2.039e12,
        80,
        "datacenter",
        "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS, INT8 624 TOPS (dense; double "
        "with sparsity); 80GB SXM 2039 GB/s HBM2e (the 40GB part has 1555 GB/s; not re-checked "
        "here: unverified).",
        "A100",
    ),
    Target(
        "l40s",
        "NVIDIA L40S",
        362e12,
        733e12,
        0.864e12,
        48,
        "datacenter",
        "NVIDIA L40S datasheet: BF16 362 TFLOPS dense (733 sparse), INT8 733 TOPS dense (1466 "
        "sparse); 864 GB/s GDDR6 (not re-checked here: unverified).",
        "L40S",
    ),
    Target(
        "rtx-4090",
        "NVIDIA GeForce RTX 4090",
        165.2e12,
        660.6e12,
        1.008e12,
        24,
        "datacenter",
        "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: FP16/BF16 tensor with FP32 "
        "accumulate 165.2 TFLOPS dense, INT8 660.6 TOPS dense; 1008 GB/s GDDR6X (not re-checked "
        "here: unverified).",
        "4090",
    ),
    Target(
        "rtx-a6000",
        "NVIDIA RTX A6000",
        154.8e12,
        309.7e12,
        0.768e12,
        48,
        "datacenter",
        "NVIDIA RTX A6000 datasheet: BF16 tensor 309.7 TFLOPS with sparsity (dense = half), "
        "INT8 309.7 TOPS dense; 768 GB/s GDDR6 (not re-checked here: unverified).",
        "A6000",
    ),
    Target(
        "a40",
        "NVIDIA A40",
        149.7e12,
        299.3e12,
        0.696e12,
        48,
        "datacenter",
        "NVIDIA A40 datasheet: BF16 tensor 299.3 TFLOPS with sparsity (dense = half), INT8 "
        "299.3 TOPS dense; 696 GB/s GDDR6 (not re-checked here: unverified).",
        "A40",
    ),
)

TARGETS: dict[str, Target] = {t.key: t for t in _TARGETS}
ALIASES = {
    "jetson-agx-thor": "jetson-thor",
    "jetson-t5000": "jetson-thor",
    "thor": "jetson-thor",
    "h100": "h100-sxm",
    "a100": "a100-80gb",
}


def get_target(name: str) -> Target:
    """The table entry for `name` (its key or an alias, any case, spaces as dashes)."""
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in TARGETS:
        raise ValueError(
            f"unknown target {name!r}; known: {', '.join(TARGETS)} "
            f"(aliases: {', '.join(ALIASES)}; `--target list` shows their figures)"
        )
    return TARGETS[key]


def format_targets() -> str:
    """The table as text: one row per target, then each entry's source."""
    lines = [
        f"{'target':<22}{'name':<26}{'BF16 TFLOPS':>12}{'INT8 TOPS':>11}{'GB/s':>8}{'GB':>6}",
    ]
    for t in TARGETS.values():
        lines.append(
            f"{t.key:<22}{t.name:<26}{t.bf16_flops / 1e12:>12.1f}{t.int8_ops / 1e12:>11.1f}"
            f"{t.bandwidth / 1e9:>8.1f}{t.memory_gb:>6.0f}"
        )
    lines.append("(dense tensor-core peaks; sources:)")
    lines.extend(f"  {t.key}: {t.source}" for t in TARGETS.values())
    return "\n".join(lines)

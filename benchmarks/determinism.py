"""Which machine settings change a seeded run's bits: the same tiny commands of every stage (toy
data, discriminator, generator, sampler) run under a reference setting and again under each variant,
every weight, image and log record compared (a SHA-1 per file, as in kill_trials.py).

A run is bit-reproducible only for the same thread count and the same CPU code paths: PyTorch picks
its vector kernels (ATen: AVX-512 / AVX2 / none), oneDNN its convolution kernels and MKL its BLAS
kernels from the CPU it finds, and a different reduction order changes the last bits of a sum.
Training amplifies such bits into different weights. The variants below stand in for another machine
on this one by capping the instruction sets each library may use.

    python benchmarks/determinism.py
"""
import argparse
import os
import shutil
import tempfile
import time

import kill_trials
from kill_trials import digest

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VARIANTS = {  # name -> environment on top of one thread each
    "the same again": {},
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "ATen AVX2 kernels": {"ATEN_CPU_CAPABILITY": "avx2"},
    "oneDNN AVX2 kernels": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "an AVX2-only machine (all three)": AVX2,
    "ATen without SIMD": {"ATEN_CPU_CAPABILITY": "default"},
}


def run_all(work, env):
    """Every stage once under `env` in `work` (always the same path: files record their paths), then
    removed -> {stage: digest}."""
    env = {**kill_trials.ENV, **env}
    stages = kill_trials.stages(work, env)  # makes the toy data and the generator the sampler uses
    out = {"toy_faces.py": digest(os.path.join(work, "toy"))}
    for name, cmd in stages:
        if name == "train_diffusion.py":
            out[name] = digest(os.path.join(work, "gen"))  # stages() already trained it under env
            continue
        kill_trials.run(cmd(os.path.join(work, name)), env)
        out[name] = digest(os.path.join(work, name))
    shutil.rmtree(work)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
        help="variants to compare with the reference (one thread, this CPU's best kernels)")
    args = parser.parse_args()
    import torch
    print(f"torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores\n")
    root = tempfile.mkdtemp(prefix="determinism_")
    try:
        t0 = time.time()
        reference = run_all(os.path.join(root, "run"), {})
        print(f"reference: {time.time() - t0:.0f} s\n")
        stages = list(reference)
        print("| variant | " + " | ".join(stages) + " |\n" + "|---" * (len(stages) + 1) + "|")
        for name in args.variants:
            got = run_all(os.path.join(root, "run"), VARIANTS[name])
            cells = []
            for s in stages:
                differ = [f for f in reference[s] if got[s].get(f) != reference[s][f]]
                cells.append("identical" if not differ and got[s].keys() == reference[s].keys()
                             else f"{len(differ)} of {len(reference[s])} files differ"
                             + (f" ({', '.join(differ)})" if len(differ) <= 2 else ""))
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

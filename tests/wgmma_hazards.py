"""Looks for wgmma register-operand hazards in the compiled kernels, without a GPU.

A Hopper wgmma whose A operand sits in registers reads them asynchronously: nothing may
write those registers until a `wgmma.wait_group` has retired it. Triton before 3.9
pipelines such wgmmas in loops without keeping their registers alive up to that wait,
so the next step can overwrite them mid-read (triton-lang/triton issue 9433, fixed by
pull request 9514). On those Tritons the package makes the loops where it happened wait
for each step's dot (kernels/tiles.drained); this checks that no hazard is left, with
whichever Triton is first on the path. WORKSPACE_NOTES.md ("A GPU-only wrong result")
tells what it found.

For each launch and fitting H100 config of a few problems: compile for sm_90a, assemble
with the ptxas that ships with Triton, disassemble, and walk the SASS (each backward
branch taken once more, for the loop's next step), tracking the register quads of
HGMMAs in flight; a write to one of them before the WARPGROUP.DEPBAR that retires its
HGMMA is reported. Prints one line per compile and exits 1 if any hazard was found.
Not part of the test suite (about a minute of compiles): run it by hand after changing
the two-pass kernels or the Triton version,

    TRITON_INTERPRET=0 python tests/wgmma_hazards.py
"""

import os
import re
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import triton

from jt_attention import plan, tuning
from compile_check import _buffer_dtypes, compile_launch, every_feature
from helpers import every_launch

# (seq_q, seq_k, head_dim, dtype, causal, every feature)
PROBLEMS = [(65, 65, 1024, "float16", True, False),     # whole rows, masked loops
            (512, 512, 1024, "float16", True, False),   # the seed's shape, causal
            (300, 700, 520, "bfloat16", True, False),   # score tiles, causal
            (512, 2048, 1024, "float16", False, False),  # score tiles
            (300, 257, 128, "float16", True, True)]     # flash kernels, every feature
H100_SMS = 132


def _assembler():
    """Triton's own ptxas for sm_90a; the Blackwell one where the PTX is newer than it reads."""
    binaries = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [os.path.join(binaries, name) for name in ("ptxas", "ptxas-blackwell")
            if os.path.exists(os.path.join(binaries, name))], binaries


def sass(ptx):
    assemblers, binaries = _assembler()
    with tempfile.TemporaryDirectory() as folder:
        source, cubin = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        for ptxas in assemblers:
            if subprocess.run([ptxas, "--gpu-name", "sm_90a", source, "-o", cubin],
                              capture_output=True).returncode == 0:
                return subprocess.run([os.path.join(binaries, "cuobjdump"), "-sass", cubin],
                                      capture_output=True, text=True, check=True).stdout
    raise RuntimeError("no ptxas here assembles this PTX for sm_90a")


def hazards(disassembly):
    """(address, instruction) of each write to a register an in-flight HGMMA reads as A."""
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in
            re.finditer(r"/\*([0-9a-f]{4})\*/\s+(.*?);", disassembly)]
    index = {address: n for n, (address, _) in enumerate(code)}
    found, in_flight, looped, n = [], [], set(), 0
    while n < len(code):
        address, instruction = code[n]
        n += 1
        if m := re.match(r"HGMMA\S* R\d+, R(\d+),", instruction):
            in_flight.append(int(m.group(1)))
        elif m := re.match(r"WARPGROUP.DEPBAR.LE gsb0, 0x(\d)", instruction):
            keep = int(m.group(1))
            in_flight = in_flight[len(in_flight) - keep:] if keep else []
        elif (m := re.match(r"(?:@!?P\d )?BRA 0x([0-9a-f]+)", instruction)) and \
                int(m.group(1), 16) < address and address not in looped:
            looped.add(address)  # the loop's next step, once
            n = index[int(m.group(1), 16)]
        elif m := re.match(r"(?:@!?P\d )?(?!ST|ISETP|BRA|BAR|DEPBAR|WARP)[A-Z][A-Z0-9.]* R(\d+)\b",
                           instruction):
            register = int(m.group(1))
            found += [(hex(address), instruction) for base in in_flight
                      if base <= register < base + 4]
    return found


def main():
    total = 0
    for seq_q, seq_k, head_dim, dtype, causal, features in PROBLEMS:
        problem = plan.Problem(1, seq_q, seq_k, 4, 2, head_dim, jnp.dtype(dtype), 0.03, causal)
        if features:
            problem = every_feature(problem)
        launches = every_launch(problem, H100_SMS)
        buffer_dtypes = _buffer_dtypes(problem, launches)
        for launch in launches:
            for config in tuning.fitting_configs(launch.kernel, "9.0", problem.footprint,
                                                 launch.has_persistent_grid):
                found = hazards(sass(compile_launch(launch, buffer_dtypes, config, "9.0")
                                     .asm["ptx"]))
                total += len(found)
                print(f"{problem.seq_q}x{problem.seq_k} D{head_dim} {dtype}"
                      f"{' causal' if causal else ''} {launch.kernel.fn.__name__}"
                      f" -> {launch.outputs[0].name} {config}: {len(found)} {found[:1]}",
                      flush=True)
    print(f"triton {triton.__version__}: {total} hazards")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())

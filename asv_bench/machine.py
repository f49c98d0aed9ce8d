"""Name this machine for asv after its CPU, and register it.

The development machines change from day to day (Zen 3 with AVX2 one day,
Zen 5 or a Xeon with AVX-512 and AVX512-BF16 the next), and numoe takes
different code paths on them, so one asv machine name must mean one kind
of CPU. The name is ``<cpu model>-<isa>-<cores>c``, for example
``amd-epyc-9b45-avx512bf16-2c`` or ``amd-epyc-7b13-avx2-2c``; ``<isa>`` is
the best of ``avx512bf16``, ``avx512``, ``avx2``, ``generic`` this CPU has.

Usage (from asv_bench/)::

    python machine.py            # register the entry in ~/.asv-machine.json, print its name
    python machine.py --name     # only print the name
    asv run --machine "$(python machine.py)" NEW_COMMIT^!

Standalone on purpose (reads /proc/cpuinfo; imports asv only to register),
so it works in any environment that has asv.
"""
import os
import platform
import re
import sys


def cpu_model_and_flags():
    """``(model name, set of flags)`` from /proc/cpuinfo (``platform`` where there is none)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if model is None and line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def isa_tag(flags):
    """The widest vector ISA numoe's kernels use on a CPU with these flags."""
    if "avx512_bf16" in flags:
        return "avx512bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_name(model=None, flags=None, ncores=None):
    """``<cpu model>-<isa>-<cores>c`` in lower case, e.g. ``amd-epyc-9b45-avx512bf16-2c``."""
    if model is None or flags is None:
        model, flags = cpu_model_and_flags()
    slug = model.lower()
    slug = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", slug)
    slug = "-".join(re.findall(r"[a-z0-9]+", slug)) or "cpu"
    return f"{slug}-{isa_tag(flags)}-{ncores or cores()}c"


def register(name):
    """Write the asv machine entry (CPU with its ISA, cores, memory, OS) under ``name``."""
    from asv.machine import Machine, MachineCollection

    entry = Machine.get_defaults()
    model, flags = cpu_model_and_flags()
    entry.update(machine=name, cpu=f"{model} ({isa_tag(flags)})", num_cpu=str(cores()))
    MachineCollection.save(name, entry)


if __name__ == "__main__":
    name = machine_name()
    if "--name" not in sys.argv[1:]:
        register(name)
    print(name)

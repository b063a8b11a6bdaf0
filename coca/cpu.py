"""What this CPU can run fast: the instruction-set features a precision choice depends on.

    cpu_features()              # frozenset of the FEATURES this machine has, from /proc/cpuinfo
    describe_cpu()              # "AMD EPYC ... | avx2 fma avx512f avx512_vnni avx512_bf16" (benches print it)

Read from the kernel's flags (Linux); elsewhere the set is empty and only fp32 is a candidate.
Tests inject a feature set instead of reading this machine's (coca/precision.py takes `features`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# kernel flag names; avx_vnni: VNNI on AVX2-only cores (Alder Lake, Zen 5 client); amx_*: Sapphire Rapids on
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def parse_flags(cpuinfo: str) -> tuple[str, frozenset[str]]:
    """(model name, the FEATURES among the first processor's flags) of a /proc/cpuinfo text."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, frozenset(f for f in FEATURES if f in flags)


@lru_cache(maxsize=1)
def _this_cpu() -> tuple[str, frozenset[str]]:
    try:
        return parse_flags(CPUINFO.read_text())
    except OSError:
        return "", frozenset()


def cpu_features() -> frozenset[str]:
    return _this_cpu()[1]


def has_vnni(features: frozenset[str]) -> bool:
    """8-bit dot products in one instruction: where int8 gains 2-4x over fp32."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & features)


def has_bf16(features: frozenset[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & features)


def describe_cpu() -> str:
    model, features = _this_cpu()
    named = " ".join(f for f in FEATURES if f in features) or "none of " + " ".join(FEATURES)
    return f"{model or 'unknown CPU'} | {named}"

"""minispatial/memory.py: the memory limit (MINISPATIAL_MEMORY_LIMIT, else half the physical
memory), the byte formatter and the message that refuses a size over the limit. Where the limit
is applied (testbed, model, run, bench) is tested in test_faults_inputs.py."""

import os

import pytest

from minispatial import memory


def test_memory_limit_is_half_the_physical_memory_or_the_variable(monkeypatch):
    monkeypatch.delenv("MINISPATIAL_MEMORY_LIMIT", raising=False)
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.physical_memory_bytes() == phys
    assert memory.memory_limit_bytes() == int(phys * memory.MEMORY_FRACTION)
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "3G")
    assert memory.memory_limit_bytes() == 3 * 2**30
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "1500000")
    assert memory.memory_limit_bytes() == 1500000
    for text, want in (("8GiB", 8 << 30), ("2k", 2048), ("1.5M", 3 << 19), (" 7T ", 7 << 40)):
        monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", text)
        assert memory.memory_limit_bytes() == want, text
    for bad in ("lots", "-1G", "0", "1.5.G"):
        monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", bad)
        with pytest.raises(ValueError, match=f"MINISPATIAL_MEMORY_LIMIT={bad!r} is invalid"):
            memory.memory_limit_bytes()


def test_memory_limit_falls_back_when_physical_memory_is_unknown(monkeypatch):
    monkeypatch.delenv("MINISPATIAL_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: None)
    assert memory.memory_limit_bytes() == memory.MEMORY_FALLBACK


def test_format_bytes():
    assert memory.format_bytes(0) == "0 B" and memory.format_bytes(1023) == "1023 B"
    assert memory.format_bytes(1536) == "1.5 KiB"
    assert memory.format_bytes(3 << 30) == "3.0 GiB"
    assert memory.format_bytes(2**60) == "1024.0 PiB"


def test_check_memory_names_the_subject_the_estimate_and_the_limit(monkeypatch):
    monkeypatch.setenv("MINISPATIAL_MEMORY_LIMIT", "1G")
    memory.check_memory("X.size=1", 1 << 30, "the thing")               # at the limit: fine
    with pytest.raises(ValueError) as e:
        memory.check_memory("X.size=2", (1 << 30) + 1, "the thing")
    assert str(e.value) == ("X.size=2 is too large: the thing would need an estimated 1.0 GiB, over the "
                            "memory limit of 1.0 GiB (set by MINISPATIAL_MEMORY_LIMIT)")
    monkeypatch.delenv("MINISPATIAL_MEMORY_LIMIT")
    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: 8 << 30)
    with pytest.raises(ValueError, match=r"limit of 4.0 GiB \(0.5 of the 8.0 GiB of physical memory; "
                                         r"MINISPATIAL_MEMORY_LIMIT overrides it\)"):
        memory.check_memory("X", 5 << 30, "the thing")
    monkeypatch.setattr(memory, "physical_memory_bytes", lambda: None)
    with pytest.raises(ValueError, match=r"a fixed default: physical memory is unknown"):
        memory.check_memory("X", memory.MEMORY_FALLBACK + 1, "the thing")

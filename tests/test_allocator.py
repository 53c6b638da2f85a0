"""taoke/allocator.py: training re-executes under mimalloc once, children get the caller's LD_PRELOAD back, and
main() called inside another program never replaces that program."""

import ctypes.util
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from taoke.allocator import OPT_OUT, mimalloc_library, preload_env, started_as_this_command

SHIPPED = sys.platform.startswith("linux") and platform.machine() == "x86_64"   # where the dependency has wheels

# a program that calls the restart the way `taoke derive` does, then says what it runs under
PROBE = textwrap.dedent("""
    import os, sys
    from taoke.allocator import restart_with_mimalloc
    print("before", os.getpid(), flush=True)
    restart_with_mimalloc()
    maps = open("/proc/self/maps").read()
    print("after", os.getpid(), "libmimalloc" in maps, repr(os.environ.get("LD_PRELOAD")),
          os.environ.get("MIMALLOC_PURGE_DELAY"))
""")


def run_probe(tmp_path, env_extra=None):
    """(the pids each start printed, the final line's fields) of the probe run as `probe.py derive`."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT, "MIMALLOC_PURGE_DELAY")}
    proc = subprocess.run([sys.executable, str(script), "derive"], env={**env, **(env_extra or {})},
                          capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    return [ln.split()[1] for ln in lines if ln.startswith("before")], lines[-1].split(maxsplit=4)


def test_the_dependency_ships_mimalloc_here():
    if not SHIPPED:
        pytest.skip("cmeel-mimalloc has wheels for Linux x86-64 only")
    lib = mimalloc_library()
    assert lib is not None and lib.name.startswith("libmimalloc.so")


@pytest.mark.skipif(not SHIPPED, reason="cmeel-mimalloc has wheels for Linux x86-64 only")
def test_restart_loads_mimalloc_once_and_hands_children_the_callers_preload(tmp_path):
    starts, after = run_probe(tmp_path)
    # two starts (the restart is an exec: same process id, so a pid file or kill -9 still names the run),
    # and the second one has mimalloc mapped
    assert len(starts) == 2 and starts[0] == starts[1] == after[1] and after[2] == "True"
    assert after[3] == "None"            # the caller had no LD_PRELOAD: its children get none
    assert after[4] == "-1"              # purging off: freed pages stay for the next step

    libm = ctypes.util.find_library("m")   # a harmless library of the caller's own to preload
    starts, after = run_probe(tmp_path, {"LD_PRELOAD": libm})
    assert len(starts) == 2 and after[2] == "True" and after[3] == repr(libm)


def test_opting_out_keeps_the_system_malloc(tmp_path):
    starts, after = run_probe(tmp_path, {OPT_OUT: "system"})
    assert len(starts) == 1 and after[2] == "False" and after[3] == "None"


@pytest.mark.skipif(not SHIPPED, reason="cmeel-mimalloc has wheels for Linux x86-64 only")
def test_preload_env_prepends_and_keeps_the_users_settings():
    env = preload_env({"LD_PRELOAD": "/opt/libfoo.so", "MIMALLOC_PURGE_DELAY": "50", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{mimalloc_library()}:/opt/libfoo.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "50" and env["PATH"] == "/bin"
    assert preload_env({OPT_OUT: "System"}) is None


def test_main_called_inside_another_program_is_not_restarted(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["taoke", "derive", "recipes/text-topics.yaml"])
    assert not started_as_this_command()     # pytest's own command line is not `taoke derive ...`

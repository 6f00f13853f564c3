"""The process's allocator: which one is loaded, what ``--allocator`` resolves to, and the
``lorafit`` command starting itself again on it (``lorafit.allocator``).

The relaunch needs tcmalloc installed; ``.ci/run`` installs it where apt can, and elsewhere the
tests that need it are skipped.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from lorafit import allocator
from lorafit.config import make_config
from lorafit.errors import LorafitError

TCMALLOC = allocator.library("tcmalloc")
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None or not sys.platform.startswith("linux"),
                                    reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
SMALL = ["--task", "rte", "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8",
         "--max-length", "32", "--max-steps", "1", "--num-threads", "1", "--no-progress"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "LORAFIT_ALLOCATOR_RELAUNCHED")}
    return {**env, **extra}


def _active_in_child(**env: str) -> str:
    code = "from lorafit.allocator import active; print(active())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=_clean_env(**env)).stdout.strip()


def test_a_library_path_names_its_allocator():
    assert allocator.allocator_of("x86_64-linux-gnu/libtcmalloc_minimal.so.4") == "tcmalloc"
    assert allocator.allocator_of("libtcmalloc.so.4.5") == "tcmalloc"
    assert allocator.allocator_of("vendor/lib/libjemalloc.so.2") == "jemalloc"
    assert allocator.allocator_of("libc.so.6") is None
    assert allocator.allocator_of("libtcmalloc_debugger.so") is None  # not lib{name}.so


def test_a_preload_keeps_other_libraries_and_one_allocator_only(monkeypatch):
    monkeypatch.setattr(allocator, "library", lambda name: f"lib/lib{allocator.LIBRARIES[name][0]}.so.9")
    assert allocator.preload("tcmalloc", "vendor/libjemalloc.so.2:vendor/libother.so") == (
        "lib/libtcmalloc_minimal.so.9:vendor/libother.so")
    assert allocator.preload("system", "vendor/libjemalloc.so.2:vendor/libother.so") == "vendor/libother.so"
    assert allocator.preload("system", "") == ""


@needs_tcmalloc
def test_active_reports_the_preloaded_allocator_and_otherwise_the_systems():
    assert _active_in_child() == "system"
    assert _active_in_child(LD_PRELOAD=TCMALLOC) == "tcmalloc"


def test_auto_is_tcmalloc_on_a_linux_cpu_where_installed_and_the_systems_elsewhere(monkeypatch):
    expected = "tcmalloc" if TCMALLOC and sys.platform.startswith("linux") else "system"
    assert allocator.resolve("auto", "cpu") == expected
    assert allocator.resolve("auto", "cuda") == "system"  # not measured on a GPU host
    assert allocator.resolve("system", "cpu") == "system"
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.resolve("auto", "cpu") == "system"


def test_an_allocator_that_is_not_installed_is_one_error_naming_the_flag_and_the_package(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(LorafitError, match=r"--allocator jemalloc: .*libjemalloc\.so.*apt install libjemalloc2"):
        allocator.resolve("jemalloc", "cpu")


def test_a_library_caller_asking_for_an_allocator_the_process_lacks_is_refused_before_any_write(tmp_path):
    from lorafit.train import train

    assert allocator.active() == "system"  # pytest runs on the system's malloc
    cfg = make_config(task="rte", max_train_samples=16, max_eval_samples=8, batch_size=8, max_length=32,
                      max_steps=1, progress=False, num_threads=1, allocator="tcmalloc",
                      output_dir=str(tmp_path / "run"))
    with pytest.raises(LorafitError, match="allocator: tcmalloc is not loaded in this process.*LD_PRELOAD="):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # "auto" asks for nothing a library caller cannot have: the run records what it got.
    summary = train(cfg.replace(allocator="auto"))
    assert summary["speed"]["allocator"] == "system"


def _train_cli(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lorafit", "train", *SMALL, "--output-dir", str(out), *flags],
                          capture_output=True, text=True, env=_clean_env(), check=False)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc, summary


@needs_tcmalloc
def test_the_command_starts_itself_again_on_tcmalloc_by_default_and_keeps_its_output(tmp_path):
    proc, summary = _train_cli(tmp_path / "auto")
    assert proc.returncode == 0, proc.stderr
    assert summary["speed"]["allocator"] == "tcmalloc"
    assert proc.stdout.count("adapter saved to") == 1  # one run: the first process printed nothing of its own
    proc, summary = _train_cli(tmp_path / "system", "--allocator", "system")
    assert proc.returncode == 0, proc.stderr
    assert summary["speed"]["allocator"] == "system"


@needs_tcmalloc
def test_a_sweep_starts_itself_again_so_its_cells_run_on_tcmalloc(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "lorafit", "sweep", *SMALL, "--ranks", "2,4", "--output-dir", str(out)],
                          capture_output=True, text=True, env=_clean_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    summaries = sorted(out.glob("**/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["speed"]["allocator"] for p in summaries} == {"tcmalloc"}


def test_a_runs_device_is_known_without_torch_where_its_build_says(monkeypatch):
    import torch

    assert allocator.run_device_type("cpu") == "cpu" and allocator.run_device_type("cuda") == "cuda"
    monkeypatch.setattr(allocator.metadata, "version", lambda name: "2.13.0+cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # never asked: a CPU build has no CUDA
    assert allocator.run_device_type("auto") == "cpu"
    monkeypatch.setattr(allocator.metadata, "version", lambda name: "2.13.0")  # any other build is asked
    assert allocator.run_device_type("auto") == "cuda"


# The command's first process, up to the moment it would start again (its exec replaced by a print).
_UNTIL_EXEC = """
import os, sys
from lorafit.cli import main

def instead_of_exec(path, argv, env):
    print("torch" in sys.modules, env["LD_PRELOAD"].split(os.pathsep)[0].rsplit("/", 1)[-1].split(".so")[0])
    sys.exit(0)

os.execve = instead_of_exec
sys.argv = ["lorafit", *sys.argv[1:]]
main()
"""


@needs_tcmalloc
@pytest.mark.parametrize("command", [["train", *SMALL], ["sweep", *SMALL, "--ranks", "2,4"]])
def test_the_command_starts_again_before_it_imports_torch(tmp_path, command):
    from importlib import metadata

    proc = subprocess.run([sys.executable, "-c", _UNTIL_EXEC, *command, "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=_clean_env(), check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported, preloaded = proc.stdout.split()
    assert preloaded == "libtcmalloc_minimal"
    # The new process imports torch again: the first one spends about 1.2 s on it only where it
    # must ask a CUDA build whether there is a GPU.
    assert imported == str(not metadata.version("torch").endswith("+cpu"))
    assert not (tmp_path / "out").exists()  # nothing done before starting again


def test_the_command_names_a_missing_allocator_in_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    from lorafit.cli import main

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert main(["train", *SMALL, "--output-dir", str(tmp_path / "run"), "--allocator", "jemalloc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafit: error: allocator: jemalloc is not loaded") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# Minor page faults of allocating, touching and freeing an 8 MiB tensor, first as glibc does by
# default, then after reuse_freed_memory(); in a fresh process, as the setting is process wide.
_FAULTS = """
import resource, torch
from lorafit import allocator

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(2 * 1024 * 1024).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def steady():  # the best of a few rounds: the heap may take a round or two to grow
    return min(faults() for _ in range(4))

default = steady()
applied = allocator.reuse_freed_memory()
print(default, applied, steady())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_reuse_freed_memory_stops_each_step_faulting_its_tensors_in_again():
    # glibc raises its mmap threshold by itself after a block is freed, at moments that vary
    # from run to run; the environment variable pins it at glibc's starting 128 KiB, so the
    # baseline is the same every time: each 8 MiB tensor a fresh mmap of 2,048 zeroed pages.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True, env=env).stdout
    default, applied, reused = out.split()
    assert applied == "True"
    assert int(default) > 5 * 2000 and int(reused) < 200, out

"""Outputs as a transaction: a failed, concurrent or interrupted write leaves the previous set
whole and no temporary file; a full disk is an exit-2 line in xa-export and xa-bench; SIGINT
and SIGTERM stop xa-generate / xa-export / xa-bench with 130 / 143, one line, nothing written."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from xa_runtime import atomic_files
from xa_runtime.atomic_files import write_all_or_nothing

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def old_set(folder: Path) -> dict[Path, bytes]:
    files = {folder / "out.png": b"old image", folder / "out.json": b'{"old": true}'}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def test_a_set_whose_last_move_fails_leaves_the_old_set_whole(tmp_path, monkeypatch):
    old = old_set(tmp_path)
    real = os.replace

    def busy_sidecar(src, dst):
        if Path(dst).name == "out.json":
            raise OSError(errno.EBUSY, "Device or resource busy", str(dst))
        real(src, dst)

    monkeypatch.setattr(atomic_files.os, "replace", busy_sidecar)
    with pytest.raises(OSError):
        write_all_or_nothing({tmp_path / "out.png": b"new image", tmp_path / "out.json": b"{}"})
    assert {p: p.read_bytes() for p in old} == old
    assert hidden(tmp_path) == []


def test_a_folder_at_the_sidecars_name_keeps_the_old_image(tmp_path):
    (tmp_path / "out.png").write_bytes(b"old image")
    (tmp_path / "out.json").mkdir()  # appeared after the run's checks
    with pytest.raises(OSError):
        write_all_or_nothing({tmp_path / "out.png": b"new image", tmp_path / "out.json": b"{}"})
    assert (tmp_path / "out.png").read_bytes() == b"old image"
    assert hidden(tmp_path) == []


def test_concurrent_writers_of_one_output_never_mix_sets(tmp_path, monkeypatch):
    # Writer A pauses after moving its image; without a lock writer B would move its whole set
    # in that pause and A's sidecar would land last, beside B's image.
    out, sidecar = tmp_path / "out.png", tmp_path / "out.json"
    real = os.replace
    a_half_done, b_done = threading.Event(), threading.Event()

    def replace(src, dst):
        real(src, dst)
        if threading.current_thread().name == "A" and Path(dst) == out:
            a_half_done.set()
            b_done.wait(timeout=1.0)

    monkeypatch.setattr(atomic_files.os, "replace", replace)

    def writer(tag: bytes):
        write_all_or_nothing({out: tag, sidecar: tag})
        if tag == b"B":
            b_done.set()

    a = threading.Thread(target=writer, args=(b"A",), name="A")
    a.start()
    assert a_half_done.wait(timeout=10)
    b = threading.Thread(target=writer, args=(b"B",), name="B")
    b.start()
    a.join(timeout=20)
    b.join(timeout=20)
    assert out.read_bytes() == sidecar.read_bytes() == b"B"  # B waited for A's whole set, then wrote its own


def test_stale_temporaries_of_dead_writers_go_and_live_ones_stay(tmp_path):
    dead, live = dead_pid(), os.getppid()
    stale = tmp_path / f".out.png.{atomic_files.TEMP_TAG}{dead}-abcd.tmp"
    kept = tmp_path / f".out.png.{atomic_files.TEMP_TAG}{live}-efgh.tmp"
    stale.write_bytes(b"x")
    kept.write_bytes(b"x")
    write_all_or_nothing({tmp_path / "out.png": b"new"})
    assert not stale.exists() and kept.exists()


SIGNAL_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from xa_runtime.atomic_files import write_all_or_nothing
from xa_runtime.cli.usage import exit_on_signals
real = os.fsync
def fsync(fd):
    real(fd)
    if len(os.listdir(sys.argv[1])) == 3:  # the old pair and the first new temporary
        os.kill(os.getpid(), signal.SIGTERM)
os.fsync = fsync
out = Path(sys.argv[1])
sys.exit(exit_on_signals("writer", lambda: write_all_or_nothing({out / "out.png": b"new", out / "out.json": b"{}"}) or 0))
"""


def test_sigterm_while_writing_leaves_no_temporary_and_the_old_set(tmp_path):
    old = old_set(tmp_path)
    done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_WRITING, str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "writer: stopped by SIGTERM"
    assert {p: p.read_bytes() for p in old} == old
    assert hidden(tmp_path) == []


SIGNAL_WHILE_MOVING = """
import os, signal, sys, threading
from pathlib import Path
from xa_runtime.atomic_files import write_all_or_nothing
from xa_runtime.cli.usage import exit_on_signals
threading.Thread(target=lambda: threading.Event().wait(60), daemon=True).start()  # a thread the kernel may pick
real = os.replace
def replace(src, dst):
    if str(dst).endswith("out.png"):
        os.kill(os.getpid(), signal.SIGTERM)  # between the first and the last move of the set
    real(src, dst)
os.replace = replace
out = Path(sys.argv[1])
sys.exit(exit_on_signals("writer", lambda: write_all_or_nothing({out / "out.png": b"new", out / "out.json": b"{}"}) or 0))
"""


def test_sigterm_while_the_set_moves_leaves_it_whole(tmp_path):
    old_set(tmp_path)
    done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_MOVING, str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr
    assert (tmp_path / "out.png").read_bytes() == b"new" and (tmp_path / "out.json").read_bytes() == b"{}"
    assert hidden(tmp_path) == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_export_on_a_full_disk_leaves_no_output_folder(tmp_path, monkeypatch, capsys):
    from xa_runtime.cli import export as export_cli
    from xa_runtime.export import onnx_export

    monkeypatch.setattr(onnx_export, "_write_checked", _enospc)
    out = tmp_path / "onnx"
    assert export_cli.main(["--output", str(out), "--graphs", "mapping", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "No space left" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_export_with_a_full_disk_at_the_manifest_keeps_the_old_export(tmp_path, monkeypatch, capsys):
    from xa_runtime.cli import export as export_cli
    from xa_runtime.export import manifest as mf

    out = tmp_path / "onnx"
    assert export_cli.main(["--output", str(out), "--graphs", "mapping", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(atomic_files.os, "fsync", _enospc)  # every new file fails to reach the disk
    assert export_cli.main(["--output", str(out), "--graphs", "mapping", "--tiny-seed", "1", "--force",
                            "--no-progress"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    mf.verify_graphs(out, ["mapping"])


def test_bench_on_a_full_disk_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from xa_runtime.cli import bench

    monkeypatch.setattr(atomic_files.os, "fsync", _enospc)
    out = tmp_path / "bench.json"
    assert bench.main(["--steps", "2", "--adapter-guidance-start", "1.0", "--runs", "1", "--warmup", "0",
                       "--no-flops", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --output") and "No space left" in err[-1]
    assert list(tmp_path.iterdir()) == []


def _stop_after(cmd: list[str], ready: str, sig: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run cmd, send `sig` once stderr has shown `ready` (and a moment of work), return the result."""
    p = subprocess.Popen(cmd, env=ENV, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    deadline = time.monotonic() + 240
    for line in p.stderr if ready else ():
        lines.append(line)
        if ready in line:
            break
        assert time.monotonic() < deadline
    time.sleep(1.0 if ready else 12.0)  # xa-export prints nothing before it ends: give it time to load
    p.send_signal(sig)
    rest = p.stderr.read()
    p.wait(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, "", "".join(lines) + rest)


CASES = {
    "generate-SIGINT": (["xa_runtime.cli.generate", "--prompt", "a", "--steps", "400", "--no-progress",
                         "--output", "out.png"], "tiny random model", signal.SIGINT, 130),
    "generate-SIGTERM": (["xa_runtime.cli.generate", "--prompt", "a", "--steps", "400", "--no-progress",
                          "--output", "out.png"], "tiny random model", signal.SIGTERM, 143),
    "export-SIGTERM": (["xa_runtime.cli.export", "--output", "onnx", "--no-progress"], None, signal.SIGTERM, 143),
    "bench-SIGINT": (["xa_runtime.cli.bench", "--steps", "400", "--runs", "1", "--warmup", "0", "--no-flops",
                      "--output", "bench.json"], "xa-bench latency", signal.SIGINT, 130),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_signal_stops_the_cli_with_one_line_and_nothing_written(case, tmp_path):
    args, ready, sig, code = CASES[case]
    done = _stop_after([sys.executable, "-m", *args], ready, sig, tmp_path)
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"stopped by {signal.Signals(sig).name}")
    assert list(tmp_path.iterdir()) == []

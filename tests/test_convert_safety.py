"""`convert` never touches its source, never replaces what it did not check, and fails early in one line.

Most tests stub the model writer (``_write_model``) because they test the file handling around it; the real
writer runs where the fault comes from it (a full disk, fp16, the two concurrent CLI runs).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import fastvideo_jax.entrypoints.convert_cli as conv_cli
from fastvideo_jax.entrypoints import output_dir
from fastvideo_jax.entrypoints.cli import main as cli_main
from fastvideo_jax.errors import CheckpointError, OutputPathError, UserError
from fastvideo_jax.testing.tiny_pipeline import write_tiny_wan_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("pipe") / "tiny")


@pytest.fixture
def src(pipeline, tmp_path) -> Path:
    """A private copy of the tiny pipeline at tmp_path/src (tests may damage it)."""
    return Path(shutil.copytree(pipeline, tmp_path / "src"))


@pytest.fixture
def stub_writer(monkeypatch) -> list[str]:
    """Replace the model writer by one that writes a small file; returns the component names written."""
    calls: list[str] = []

    def write(name, src, dst, to, precision):
        calls.append(name)
        dst.mkdir(parents=True)
        (dst / "weights").write_text(f"{name} {precision}")

    monkeypatch.setattr(conv_cli, "_write_model", write)
    return calls


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_cli(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-c", script] if script else ["-m", "fastvideo_jax.entrypoints.cli"]), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FASTVIDEO_JAX_DEBUG", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# R1: DST is never SRC, inside SRC or around SRC, however it is spelled.

def _dotdot(tmp: Path, src: Path) -> Path:
    (tmp / "other").mkdir()
    return tmp / "other" / ".." / "src"


def _link_to_src(tmp: Path, src: Path) -> Path:
    (tmp / "link").symlink_to(src)
    return tmp / "link"


def _through_symlinked_parent(tmp: Path, src: Path) -> Path:
    (tmp / "parent").symlink_to(tmp)
    return tmp / "parent" / "src"


def _inside_src_via_symlink(tmp: Path, src: Path) -> Path:
    (tmp / "link").symlink_to(src)
    return tmp / "link" / "converted"


def _existing_folder_inside_src(tmp: Path, src: Path) -> Path:
    (tmp / "link").symlink_to(src / "transformer")
    return tmp / "link"


def _parent_of_src(tmp: Path, src: Path) -> Path:
    (tmp / "up").symlink_to(tmp)
    return tmp / "up"


@pytest.mark.parametrize("spell", [_dotdot, _link_to_src, _through_symlinked_parent, _inside_src_via_symlink,
                                   _existing_folder_inside_src, _parent_of_src])
def test_dst_that_is_in_or_around_src_is_refused_before_any_work(src, tmp_path, stub_writer, spell):
    dst = spell(tmp_path, src)
    before, entries = _digest(src), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputPathError, match="SRC .* and DST .*") as e:
        conv_cli.convert(src, dst, overwrite=True, progress=False)
    assert str(src) in str(e.value) and str(dst) in str(e.value) and "\n" not in str(e.value)
    assert stub_writer == []
    assert _digest(src) == before, "SRC was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == entries, "something was created beside SRC/DST"


def test_dst_is_src_through_cli_is_one_line(src, tmp_path, capsys):
    before = _digest(src)
    (tmp_path / "other").mkdir()
    assert cli_main(["convert", str(src), str(tmp_path / "other" / ".." / "src"), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SRC ") and err.count("\n") == 1, err
    assert _digest(src) == before


# R2: no races, no replacing anything unchecked.

def test_locked_dst_is_refused(src, tmp_path, stub_writer):
    dst = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(OutputPathError, match=r"another conversion into it is running \(pid 4242"):
            conv_cli.convert(src, dst, progress=False)
    finally:
        os.close(fd)
    assert stub_writer == [] and not dst.exists()


@pytest.mark.parametrize("content", [None, "theirs.txt"])
def test_dst_appearing_during_the_run_is_not_replaced(src, tmp_path, monkeypatch, content):
    dst = tmp_path / "out"
    real = conv_cli._write_all

    def racing(*args):
        real(*args)
        dst.mkdir()  # another program creates DST (empty, or with a file) while we convert
        if content:
            (dst / content).write_text("theirs")

    monkeypatch.setattr(conv_cli, "_write_all", racing)
    monkeypatch.setattr(conv_cli, "_write_model", lambda name, s, d, *a: d.mkdir())
    with pytest.raises(OutputPathError, match="appeared while converting; nothing was replaced"):
        conv_cli.convert(src, dst, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ([content] if content else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], "partial output or lock left behind"


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
def test_new_dst_published_without_replace(src, tmp_path, stub_writer, monkeypatch, renameat2):
    if not renameat2:
        monkeypatch.setattr(output_dir, "_renameat2", lambda *a: False)
    out = conv_cli.convert(src, tmp_path / "out", progress=False)
    assert out == tmp_path / "out" and (out / "model_index.json").is_file()
    assert sorted(stub_writer) == ["text_encoder", "transformer", "vae"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["exchange", "fallback"])
def test_overwrite_keeps_the_old_dst_until_the_new_one_is_in_place(src, tmp_path, stub_writer, monkeypatch,
                                                                   renameat2):
    dst = conv_cli.convert(src, tmp_path / "out", progress=False)
    (dst / "old.txt").write_text("old")
    real_rename = os.rename

    def failing_exchange(a, b, flags):  # the atomic swap fails
        raise OSError(errno.EIO, "simulated I/O error", str(b))

    def failing_rename(a, b):  # fallback: DST moved aside, then putting the new folder in place fails
        if ".partial-" in Path(a).name:
            raise OSError(errno.EIO, "simulated I/O error", str(b))
        real_rename(a, b)

    with monkeypatch.context() as m:
        m.setattr(output_dir, "_renameat2", failing_exchange if renameat2 else (lambda *a: False))
        m.setattr(output_dir.os, "rename", failing_rename)
        with pytest.raises(OSError, match="simulated I/O error"):
            conv_cli.convert(src, dst, overwrite=True, progress=False)
    assert (dst / "old.txt").read_text() == "old", "the old DST was lost"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    if not renameat2:
        monkeypatch.setattr(output_dir, "_renameat2", lambda *a: False)
    conv_cli.convert(src, dst, overwrite=True, progress=False)
    assert not (dst / "old.txt").exists() and (dst / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_overwrite_replaces_only_a_pipeline_directory(src, tmp_path, stub_writer):
    dst = tmp_path / "home"
    dst.mkdir()
    (dst / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match="replaces only a pipeline directory"):
        conv_cli.convert(src, dst, overwrite=True, progress=False)
    assert (dst / "thesis.tex").read_text() == "years of work" and stub_writer == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="exists and is not a directory"):
        conv_cli.convert(src, tmp_path / "file", overwrite=True, progress=False)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partial_folders_are_cleaned(src, tmp_path, stub_writer, caplog):
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-abc123"
    (stale / "transformer").mkdir(parents=True)
    live = tmp_path / f".out.partial-{os.getppid()}-def456"  # a live process's: kept
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-xyz"  # another DST's: not ours to touch
    other.mkdir()
    with caplog.at_level("WARNING"):
        conv_cli.convert(src, tmp_path / "out", progress=False)
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed {stale}" in caplog.text


def test_old_dst_of_an_interrupted_replace_is_restored(src, tmp_path, stub_writer, caplog):
    old = tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    with caplog.at_level("WARNING"), pytest.raises(FileExistsError, match="--overwrite"):
        conv_cli.convert(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model_index.json").read_text() == "{}" and not old.exists()
    assert "restored" in caplog.text


_SLOW_CONVERT = """
import sys, time
from pathlib import Path
import fastvideo_jax.entrypoints.convert_cli as c
from fastvideo_jax.entrypoints.cli import main
def slow(name, src, dst, to, precision):
    dst.mkdir(parents=True)
    Path(sys.argv[-1]).write_text("started")
    time.sleep(120)
c._write_model = slow
sys.exit(main(sys.argv[1:-1]))
"""


def test_sigterm_cleans_up_like_ctrl_c(src, tmp_path):
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "convert", str(src), str(tmp_path / "out"),
                             "--no-progress", str(marker)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "never started"
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 130, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "started"], "partial output or lock left behind"


def test_two_concurrent_runs_into_one_dst(src, tmp_path):
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FASTVIDEO_JAX_DEBUG", None)
    cmd = [sys.executable, "-m", "fastvideo_jax.entrypoints.cli", "convert", str(src), str(dst), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert err.count("\n") == 1 and ("another conversion" in err or "--overwrite" in err), err
    assert (dst / "transformer" / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# Checked before any work: every listed folder, every model at its precision, free space.

def test_missing_component_folder_fails_up_front(src, tmp_path, stub_writer):
    shutil.rmtree(src / "vae")
    with pytest.raises(CheckpointError, match=r"lists \['vae'\], but SRC has no such folder"):
        conv_cli.convert(src, tmp_path / "out", progress=False)
    assert stub_writer == [] and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_fp16_refused_for_umt5_before_any_work(src, tmp_path, stub_writer):
    with pytest.raises(UserError, match=r"text_encoder: UMT5EncoderModel cannot be converted at --dtype fp16"):
        conv_cli.convert(src, tmp_path / "out", dtype="fp16", progress=False)
    assert stub_writer == [] and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_too_little_free_space_fails_up_front(src, tmp_path, stub_writer, monkeypatch):
    monkeypatch.setattr(conv_cli.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputPathError, match=r"^no space left on device: .* needs about 1\.\d MiB"):
        conv_cli.convert(src, tmp_path / "out", progress=False)
    assert stub_writer == []


def test_disk_full_midway_is_one_error_and_leaves_nothing(src, tmp_path, monkeypatch):
    from fastvideo_jax.models.loader import orbax_io

    real, written = orbax_io.save_params, []

    def filling(component_dir, state, precision):
        if written:
            (Path(component_dir) / "params").mkdir()
            raise OSError(errno.ENOSPC, "No space left on device", str(component_dir / "params"))
        written.append(component_dir)
        real(component_dir, state, precision)

    monkeypatch.setattr(orbax_io, "save_params", filling)
    with pytest.raises(OutputPathError, match=rf"^no space left on device: {re.escape(os.path.realpath(tmp_path))}"):
        conv_cli.convert(src, tmp_path / "out", progress=False)
    assert len(written) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


_NO_PREFLIGHT = """
import sys
import fastvideo_jax.entrypoints.convert_cli as c
from fastvideo_jax.entrypoints.cli import main
c._check_space = lambda *a: None  # let the writes themselves hit the full disk
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk_is_one_line(src, tiny_tmpfs):
    for script, message in [(None, "needs about"), (_NO_PREFLIGHT, "(nothing was written)")]:
        r = _run_cli("convert", str(src), str(tiny_tmpfs / "out"), "--no-progress", script=script)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"error: no space left on device: {tiny_tmpfs}") and r.stderr.count("\n") == 1, \
            r.stderr[:3000]
        assert message in r.stderr
        assert list(tiny_tmpfs.iterdir()) == [], "partial output left on the full disk"


# R5: known errors through the real command: one line, exit 2.

@pytest.mark.parametrize("args,message", [
    (["/nonexistent/pipeline"], "not a pipeline directory"),
    (["{tmp}"], "no model_index.json"),
    (["{src}", "--dtype", "fp16"], "cannot be converted at --dtype fp16"),
])
def test_cli_errors_are_one_line(src, tmp_path, args, message):
    args = [a.format(tmp=tmp_path / "empty", src=src) for a in args]
    (tmp_path / "empty").mkdir()
    r = _run_cli("convert", args[0], str(tmp_path / "out"), *args[1:], "--no-progress")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and not (tmp_path / "out").exists()


# R6: an orbax restore error reads as its cause, not as orbax's bound-method dump.

def test_restore_error_names_the_cause_not_a_bound_method(pipeline, tmp_path):
    from fastvideo_jax.models.loader.component_loader import TransformerLoader

    out = conv_cli.convert(pipeline, tmp_path / "out", progress=False)
    params = out / "transformer" / "params"
    # array chunks only (not the metadata): orbax's read error is the one that printed a bound method
    data = [p for p in params.glob("ocdbt.process_*/d/*") if p.is_file()]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(CheckpointError) as e:
        TransformerLoader().load(out / "transformer")
    msg = str(e.value)
    assert msg.startswith(f"{params}: cannot restore (ValueError: OUT_OF_RANGE: Error reading "), msg[:2000]
    assert "is not valid for value of size 20" in msg
    assert "bound method" not in msg and "tensorstore_spec" not in msg and "\n" not in msg and len(msg) < 1000


def test_model_folder_with_a_class_of_another_kind_fails_up_front(src, tmp_path, stub_writer):
    shutil.rmtree(src / "vae")
    shutil.copytree(src / "transformer", src / "vae")  # a DiT where the VAE belongs
    with pytest.raises(CheckpointError, match=r"vae/config.json: class \['WanTransformer3DModel'\] is not a vae"):
        conv_cli.convert(src, tmp_path / "out", progress=False)
    assert stub_writer == [] and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_orbax_reports_held_then_replayed_on_success_dropped_on_a_full_disk(caplog, capsys, monkeypatch):
    import logging

    from fastvideo_jax.models.loader import orbax_io

    monkeypatch.delenv("FASTVIDEO_JAX_DEBUG", raising=False)
    stderr = sys.stderr

    def succeeds():
        logging.getLogger("absl").warning("a warning worth keeping")
        print("a line worth keeping", file=sys.stderr)
        return 7

    def disk_full():
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        print("Traceback (most recent call last): ...", file=sys.stderr)
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']")

    def translate(e):
        return OSError(errno.ENOSPC, "No space left on device", "/dst") if orbax_io.is_no_space(e) else None

    with caplog.at_level("WARNING"):
        assert orbax_io._quietly(succeeds, translate) == 7
    assert "a warning worth keeping" in caplog.text and "a line worth keeping" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(OSError) as e:
        orbax_io._quietly(disk_full, translate)
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/dst"
    assert caplog.text == "" and capsys.readouterr().err == "" and sys.stderr is stderr


def test_abandoned_no_space_writes_reported_after_the_hold_are_dropped(caplog, monkeypatch):
    """Python 3.12: the abandoned writes' "Task exception was never retrieved" can come after the hold ended
    (when the loop's tasks are collected at exit); after a full disk those records are dropped, others kept."""
    import logging

    from fastvideo_jax.models.loader import orbax_io

    monkeypatch.delenv("FASTVIDEO_JAX_DEBUG", raising=False)
    asyncio_logger = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_logger, "filters", list(asyncio_logger.filters))  # restored after the test

    def disk_full():
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']")

    with pytest.raises(OSError):
        orbax_io._quietly(disk_full, lambda e: OSError(errno.ENOSPC, "No space left on device", "/dst"))
    with caplog.at_level("WARNING"):
        asyncio_logger.error("Task exception was never retrieved\nfuture: <Task exception=ValueError('Failed "
                             "writing: No space left on device [os_error_code=\\'28\\']')>")
        asyncio_logger.error("Task exception was never retrieved\nfuture: <Task exception=KeyError('x')>")
        asyncio_logger.error("an unrelated asyncio error")
    assert "No space left" not in caplog.text
    assert "KeyError" in caplog.text and "an unrelated asyncio error" in caplog.text
    with warnings.catch_warnings(record=True) as seen:  # catch_warnings keeps the filters installed above
        warnings.warn_explicit("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited",
                               RuntimeWarning, "sys", 1)
        warnings.warn_explicit("coroutine 'fetch_page' was never awaited", RuntimeWarning, "sys", 1)
    assert [str(w.message) for w in seen] == ["coroutine 'fetch_page' was never awaited"]


def test_converted_dir_gets_ordinary_permissions(src, tmp_path, stub_writer):
    """The temporary folder is private (mkdtemp: 0700); the published DST has 0777 less the umask, as mkdir."""
    old = os.umask(0o022)
    try:
        conv_cli.convert(src, tmp_path / "dst", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "dst").stat().st_mode & 0o777 == 0o755

"""Atomic writes (mamba2.fsutil) and the writers built on them: permissions follow the umask, an interrupted
swap is put back by the next save or load, a failed fill changes nothing. Real files in tmp_path throughout."""

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import word_tokenizer
from mamba2 import Mamba2Config, Mamba2LM, checkpoints, fsutil
from mamba2.errors import UserError
from mamba2.interop import load, save_pretrained
from mamba2.plots import plot_loss_curve
from mamba2.tokenizer import ByteTokenizer, HFTokenizer

TINY = dict(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=8)


def model(seed=0):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(**TINY)).eval()


def logits(m):
    with torch.no_grad():
        return m(torch.arange(24).reshape(2, 12))


@pytest.fixture
def umask():
    """Run the test under a chosen umask (``umask(0o022)``), restoring the previous one afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of every entry below it, by path relative to ``root``."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def expected_modes(root: Path, dir_mode: int, file_mode: int) -> dict[str, int]:
    return {k: dir_mode if (root / k).is_dir() else file_mode for k in modes(root)}


# ------------------------------------------------------------------------------------------ permissions
@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_every_writer_gives_the_permissions_of_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    tok = HFTokenizer(word_tokenizer(tmp_path / "words.json", [f"w{i}" for i in range(20)]))
    m = model()
    written = [save_pretrained(m, tmp_path / fmt, format=fmt, tokenizer=tok) for fmt in ("mamba2", "official", "hf")]
    opt = torch.optim.AdamW(m.parameters())
    written.append(checkpoints.save(tmp_path / "ck", m, m.config, tok, opt, {"step": 1},
                                    extra_files={"loss_curve.png": lambda p: plot_loss_curve([(0, 1.0)], [], p)}))
    for d in written:
        assert len(modes(d)) >= 4 and modes(d) == expected_modes(d, dir_mode, file_mode), d
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file() and (tmp_path / "ck" / "trainer_state.pt").is_file()
    plot_loss_curve([(0, 2.0), (1, 1.5)], [(1, 1.7)], tmp_path / "curve.png")
    assert stat.S_IMODE((tmp_path / "curve.png").stat().st_mode) == file_mode



@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_convert_to_every_format_gives_the_permissions_of_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    """Issue 15: convert --to hf / --to official wrote a 0700 directory and a 0600 model.safetensors."""
    from mamba2.cli import main

    umask(0o077 if mask == 0o022 else 0o022)   # the source's own modes must not carry over
    tok = word_tokenizer(tmp_path / "words.json", [f"w{i}" for i in range(20)])
    save_pretrained(model(), tmp_path / "src", format="official", tokenizer=HFTokenizer(tok))
    umask(mask)
    runs = {"mamba2": [], "official": [], "official_st": ["--weights", "safetensors"], "hf": []}
    for name, flags in runs.items():
        out = tmp_path / name
        assert main(["convert", str(tmp_path / "src"), str(out), "--to", name.split("_")[0], *flags]) == 0
        assert len(modes(out)) >= 4 and modes(out) == expected_modes(out, dir_mode, file_mode), name
        assert main(["convert", str(tmp_path / "src"), str(out), "--to", name.split("_")[0], *flags,
                     "--overwrite"]) == 0
        assert modes(out) == expected_modes(out, dir_mode, file_mode), f"{name} --overwrite"

def test_private_temporary_entries_made_inside_fill_get_the_umask_too(tmp_path, umask):
    def fill(d):
        sub = Path(tempfile.mkdtemp(dir=d))            # 0700
        fd, name = tempfile.mkstemp(dir=sub)           # 0600
        os.close(fd)
        (d / "run.sh").write_text("#!/bin/sh\n")
        (d / "run.sh").chmod(0o700)
    out = fsutil.atomic_dir(tmp_path / "d", fill, is_valid=lambda p: True)
    got = modes(out)
    assert got.pop("run.sh") == 0o755                  # executable stays executable
    assert got == {k: 0o755 if (out / k).is_dir() else 0o644 for k in got} and len(got) == 3


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path, umask):
    f = tmp_path / "notes.txt"
    fsutil.atomic_file(f, lambda p: p.write_text("one"))
    assert f.read_text() == "one" and stat.S_IMODE(f.stat().st_mode) == 0o644

    def half(p):
        p.write_text("tw")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        fsutil.atomic_file(f, half)
    assert f.read_text() == "one" and sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(UserError, match=r"cannot write .*missing[/\\]x\.txt"):
        fsutil.atomic_file(tmp_path / "missing" / "x.txt", lambda p: p.write_text("x"))


# ------------------------------------------------------------------------------------------ interrupted swaps
def crash_between_renames(target: Path) -> None:
    """What a save killed between its two renames leaves: the old directory moved aside, no target."""
    os.replace(target, target.parent / f".{target.name}.old-killed")
    assert not target.exists()


def test_interrupted_checkpoint_swap_is_put_back_by_the_next_load(tmp_path):
    old = model(1)
    checkpoints.save(tmp_path / "ck", old, old.config, ByteTokenizer())
    crash_between_renames(tmp_path / "ck")
    assert torch.equal(logits(checkpoints.load(tmp_path / "ck")[0]), logits(old))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.parametrize("fmt", ["mamba2", "official", "hf"])
def test_interrupted_export_swap_is_put_back_by_the_next_load(tmp_path, fmt):
    old = model(1)
    save_pretrained(old, tmp_path / "m", format=fmt, tokenizer=ByteTokenizer())
    crash_between_renames(tmp_path / "m")
    assert torch.equal(logits(load(tmp_path / "m").model), logits(old))
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_interrupted_swap_is_put_back_by_the_next_save(tmp_path):
    old, new = model(1), model(2)
    checkpoints.save(tmp_path / "ck", old, old.config, ByteTokenizer())
    crash_between_renames(tmp_path / "ck")
    checkpoints.save(tmp_path / "ck", new, new.config, ByteTokenizer())
    assert torch.equal(logits(checkpoints.load(tmp_path / "ck")[0]), logits(new))
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    # the put-back directory counts as existing: without overwrite an export refuses to replace it
    save_pretrained(old, tmp_path / "hf", format="hf")
    crash_between_renames(tmp_path / "hf")
    with pytest.raises(UserError, match=r"hf: it holds a model directory already \(--overwrite"):
        save_pretrained(new, tmp_path / "hf", format="hf")
    assert torch.equal(logits(load(tmp_path / "hf").model), logits(old))


def test_a_backup_that_is_not_valid_is_not_put_back(tmp_path):
    junk = tmp_path / ".d.old-killed"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    fsutil.recover(tmp_path / "d", is_valid=lambda p: (p / "config.json").is_file())
    assert not (tmp_path / "d").exists() and (junk / "notes.txt").is_file()


# ------------------------------------------------------------------------------------------ failed fills, refusals
def test_a_failing_fill_leaves_the_old_directory_and_no_temporary_one(tmp_path):
    target = tmp_path / "d"
    fsutil.atomic_dir(target, lambda d: (d / "a.txt").write_text("old"), is_valid=lambda p: True)

    def fail(d):
        (d / "a.txt").write_text("new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        fsutil.atomic_dir(target, fail, is_valid=lambda p: True, overwrite=True)
    assert (target / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["d"]
    with pytest.raises(RuntimeError, match="disk full"):
        fsutil.atomic_dir(tmp_path / "fresh", fail, is_valid=lambda p: True)
    assert sorted(os.listdir(tmp_path)) == ["d"]
    with pytest.raises(UserError, match=r"cannot write directory .*d: "):
        fsutil.atomic_dir(target, lambda d: open(d / "no" / "such", "w"), is_valid=lambda p: True, overwrite=True)
    assert (target / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["d"]


def test_stale_temporary_directories_of_killed_saves_are_removed(tmp_path):
    stale = tmp_path / ".d.tmp-killed"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"\0" * 10)
    fsutil.atomic_dir(tmp_path / "d", lambda d: (d / "a.txt").write_text("x"), is_valid=lambda p: True)
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_refusals_name_the_path_and_touch_nothing(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"busy: it holds a model directory already \(--overwrite"):
        fsutil.atomic_dir(busy, lambda d: None, is_valid=lambda p: True, what="model directory")
    for overwrite in (False, True):      # --overwrite would not help: the refusal says so at once
        with pytest.raises(UserError, match=r"busy: it is not empty and is not a model directory \(give a new"):
            fsutil.atomic_dir(busy, lambda d: None, is_valid=lambda p: False, overwrite=overwrite,
                              what="model directory")
    with pytest.raises(UserError, match=r"busy: it is not empty and is not a checkpoint"):
        checkpoints.ensure_writable(busy)                  # what train checks before it starts
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file: it is a file"):
        fsutil.atomic_dir(tmp_path / "file", lambda d: None, is_valid=lambda p: True, overwrite=True)
    assert (busy / "notes.txt").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["busy", "file"]
    (tmp_path / "empty").mkdir()
    fsutil.atomic_dir(tmp_path / "empty", lambda d: (d / "a").write_text("a"), is_valid=lambda p: False)
    assert (tmp_path / "empty" / "a").read_text() == "a"


@pytest.mark.parametrize("fmt", ["mamba2", "hf", "official", "official-bin"])
def test_a_full_disk_is_one_line_and_the_old_directory_stays(tmp_path, monkeypatch, fmt):
    """The writers fail with the library's own error types on a full disk (safetensors: SafetensorError, torch.save:
    RuntimeError): every save raises UserError naming the directory and the reason; the old one stays."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_torch(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    target = tmp_path / "m"
    kind = "official" if fmt.startswith("official") else fmt
    weights = "bin" if fmt == "official-bin" else None
    if fmt == "mamba2":
        checkpoints.save(target, model(), model().config, ByteTokenizer(), trainer_state={"step": 1})
    else:
        save_pretrained(model(), target, format=kind, tokenizer=ByteTokenizer(), weights=weights)
    before = sorted(p.name for p in target.iterdir())
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(safetensors.torch, "save_model", full)
    monkeypatch.setattr(torch, "save", full_torch)
    with pytest.raises(UserError, match=rf"cannot write .*{target.name}: .*(No space left|write failed)"):
        if fmt == "mamba2":
            checkpoints.save(target, model(1), model().config, ByteTokenizer(), trainer_state={"step": 2})
        else:
            save_pretrained(model(1), target, format=kind, tokenizer=ByteTokenizer(), weights=weights, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    torch.testing.assert_close(logits(load(target).model), logits(model()))


def test_a_short_trainer_state_write_is_one_line(tmp_path, monkeypatch):
    """torch.save's zip writer can fail on a full disk with only "unexpected pos A vs B" (no word of writing): the
    checkpoint save still ends in one line naming the directory, and the old checkpoint stays."""
    target = tmp_path / "m"
    checkpoints.save(target, model(), model().config, ByteTokenizer(), trainer_state={"step": 1})

    def short(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 234752 vs 234644")

    monkeypatch.setattr(torch, "save", short)
    with pytest.raises(UserError, match=rf"cannot write .*{target.name}: the file was not written whole \(is the "
                                        r"disk full\?\)"):
        checkpoints.save(target, model(1), model().config, ByteTokenizer(), trainer_state={"step": 2})
    torch.testing.assert_close(logits(load(target).model), logits(model()))


def test_a_lock_refuses_a_second_holder_survives_the_swap_and_a_left_lock_file_blocks_nothing(tmp_path):
    """fsutil.locked: flock on .NAME.lock beside the target (a second open of it is refused like another process's,
    also after atomic_dir replaced the target); deleted when released; a file left by a killed holder (its lock
    gone with it) is locked again."""
    pytest.importorskip("fcntl")
    target, busy = tmp_path / "runs/c3", (lambda lock: f"busy: {lock}")
    with fsutil.locked(target, busy=busy) as lock:
        assert lock == tmp_path / "runs/.c3.lock" and lock.is_file()
        fsutil.atomic_dir(target, lambda d: (d / "f").write_text("x"), is_valid=lambda d: True, overwrite=True)
        with pytest.raises(fsutil.Busy, match="busy: .*/runs/.c3.lock"):
            with fsutil.locked(target, busy=busy):
                pass
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["c3"]
    lock.write_text("")
    with fsutil.locked(target, busy=busy) as again:
        assert again == lock
    assert not lock.exists()
    with fsutil.locked(tmp_path / "missing/run", busy=busy, create_parent=False) as none:
        assert none is None and not (tmp_path / "missing").exists()


def test_a_symbolic_link_target_replaces_the_directory_it_leads_to_under_one_lock(tmp_path):
    """atomic_dir / check_writable / locked on a link: the directory the link leads to is replaced (the link stays
    a link to it), a dangling link's directory is created, and the link and the directory share one lock. (Before:
    the swap renamed over the link and failed after the whole run, and each name had a lock of its own.)"""
    pytest.importorskip("fcntl")
    real, link, busy = tmp_path / "real", tmp_path / "link", (lambda lock: f"busy: {lock}")
    valid = lambda d: (d / "f").is_file()                                           # noqa: E731
    fsutil.atomic_dir(real, lambda d: (d / "f").write_text("old"), is_valid=valid)
    link.symlink_to("real")
    fsutil.check_writable(link, is_valid=valid, overwrite=True)
    assert fsutil.atomic_dir(link, lambda d: (d / "f").write_text("new"), is_valid=valid, overwrite=True) == link
    assert link.is_symlink() and (real / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]           # no backup or temporary left
    with pytest.raises(UserError, match="holds a directory already"):
        fsutil.atomic_dir(link, lambda d: None, is_valid=valid)
    with fsutil.locked(real, busy=busy):
        with pytest.raises(fsutil.Busy, match="busy: .*/.real.lock"):
            with fsutil.locked(link, busy=busy):
                pass
    (tmp_path / "file").write_text("old")
    (tmp_path / "file_link").symlink_to("file")
    fsutil.atomic_file(tmp_path / "file_link", lambda p: p.write_text("new"))
    assert (tmp_path / "file_link").is_symlink() and (tmp_path / "file").read_text() == "new"
    assert fsutil.lock_path(tmp_path / "file_link") == tmp_path / ".file.lock"       # the lock of the same file
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "made")
    fsutil.atomic_dir(dangling, lambda d: (d / "f").write_text("x"), is_valid=valid)
    assert dangling.is_symlink() and (tmp_path / "made/f").read_text() == "x"

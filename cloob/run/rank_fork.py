"""Ranks forked from torchrun's agent, with the trainer already imported, instead of new interpreters.

A rank started as `python -u -m cloob.train ...` spends its first 4-5 s of CPU importing: torch, then
torch._dynamo (torch's own optimizers import it at construction), torchvision and open_clip. Every
rank of every run, and every rank again when torchrun restarts the group, pays that, although all of
them import the same modules. Under the launcher, `cloob.run.torchrun` imports them once, in the agent
(`preload`), and each rank is a fork of the agent (`install` replaces the Popen of torch's
SubprocessHandler for that one command): the ranks start with everything loaded, and copy-on-write
shares the pages. Everything else about the group stays torch's: how ranks are watched, how their
failures are collected, how they are stopped (a signal to each rank's process group) and restarted.

A forked rank gets what `python -u -m cloob.train ...` got from Popen and the interpreter: a session
of its own (start_new_session), the environment torch gives the rank, stdout and stderr written
through (-u), no file descriptor but 0-2 (close_fds), default signal handlers, OMP_NUM_THREADS
applied (the agent's OpenMP read its environment before torchrun set it), `python -u -m cloob.train
...` as its command line in ps and /proc (with `cloob-rank<RANK>` as its short name, in top and
`ps -o comm`), and an exit status as the interpreter's (the SystemExit code; 1 after an uncaught
exception, its traceback printed). One thing differs: /proc/PID/environ shows the environment a
process started with, the agent's, not the rank's variables (RANK, LOCAL_RANK, ...), which are set
in the rank itself; its name carries its rank.

A rank is still started as a new interpreter where forking is not safe or not asked for: with
CLOOB_RANK_START=exec, for any command but `-m cloob.train` (numactl binding, another script), and
once the agent has opened the GPU driver (a child of a process that initialized CUDA cannot use it;
nothing this agent imports does, tests/test_rank_fork.py checks that).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time
import warnings

_MODULE = "cloob.train"
_PR_SET_NAME = 15
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/kfd", "/dev/dri/")  # opened by a driver's init
_DEFAULT_HANDLERS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGALRM)


def wanted(environ=None) -> bool:
    """Ranks are forked unless CLOOB_RANK_START=exec (the escape hatch: a new interpreter per rank)."""
    how = (os.environ if environ is None else environ).get("CLOOB_RANK_START", "fork").strip().lower() or "fork"
    if how not in ("fork", "exec"):
        from cloob.errors import CloobError

        raise CloobError(f"CLOOB_RANK_START={how!r}", "set it to fork (the default) or exec")
    return how == "fork"


def rank_args(command) -> list[str] | None:
    """The trainer's arguments when `command` is torchrun's rank command for `-m cloob.train`
    (`python -u -m cloob.train ARGS`), else None."""
    command = [str(a) for a in command]
    if len(command) >= 4 and command[0] == sys.executable and command[1:4] == ["-u", "-m", _MODULE]:
        return command[4:]
    return None


def gpu_driver_open(fd_dir: str = "/proc/self/fd") -> bool:
    """Whether this process holds a GPU driver's device open: CUDA (or ROCm) was initialized here, and
    a forked child could not use it."""
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return True  # cannot tell: do not fork
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if target.startswith(_GPU_DEVICES):
            return True
    return False


def preload(args: list[str]) -> None:
    """Import in this process what a rank of `cloob.train ARGS` imports first, as its __main__ does
    (timm left out when the architecture does not use it)."""
    from cloob.architectures import skip_timm_for_args

    skip_timm_for_args(args)
    import cloob.train.loop  # noqa: F401 (the import is the point)


def install(training_script: str, module: bool, script_args: list[str]) -> bool:
    """In torchrun's agent, before it starts any rank: preload the trainer and have torch's
    SubprocessHandler fork the ranks of `-m cloob.train`. Returns whether it did."""
    if not (module and training_script == _MODULE and wanted()):
        return False
    preload(list(script_args))
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    popen = subprocess_handler.SubprocessHandler._popen

    def fork_or_popen(self, args, env):
        argv = rank_args(args)
        if argv is None or gpu_driver_open():
            return popen(self, args, env)
        return start(list(args), argv, env, self._stdout, self._stderr, self.local_rank_id)

    subprocess_handler.SubprocessHandler._popen = fork_or_popen
    return True


class ForkedRank:
    """What torch's SubprocessHandler uses of a Popen (pid, poll, wait, returncode), for a forked rank."""

    def __init__(self, pid: int, args: list[str]):
        self.pid, self.args, self.returncode = pid, args, None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: as Popen, call it a success
                self.returncode = 0
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            return self._reap(0)
        end, delay = time.monotonic() + timeout, 0.0005
        while self.poll() is None:
            left = end - time.monotonic()
            if left <= 0:
                import subprocess

                raise subprocess.TimeoutExpired(self.args, timeout)
            delay = min(delay * 2, left, 0.05)
            time.sleep(delay)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(command: list[str], argv: list[str], env: dict[str, str], stdout, stderr, local_rank: int) -> ForkedRank:
    """Fork one rank of `python -u -m cloob.train ARGV` from this process."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would write this process's buffered output again
    inherited = _open_fds()
    gc.freeze()  # the child never collects (and so never closes) this process's objects
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12: fork() with threads running
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(command, argv, env, stdout, stderr, local_rank, inherited)
            finally:
                os._exit(code)  # never back into the agent's frames
    finally:
        gc.unfreeze()
    return ForkedRank(pid, command)


def _child(command, argv, env, stdout, stderr, local_rank, inherited) -> int:
    os.setsid()
    for sig in _DEFAULT_HANDLERS:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    atexit._clear()  # the agent's; the rank's own run at its end
    for fd, stream in ((1, stdout), (2, stderr)):
        if stream is not None:
            os.dup2(stream.fileno(), fd)
    _close_inherited(inherited)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent if a library replaced the stream
        if reconfigure is not None:
            reconfigure(line_buffering=True, write_through=True)
    os.environ.clear()
    os.environ.update(env)
    logging.root.handlers.clear()  # the trainer's basicConfig takes effect, as in a new interpreter
    logging.root.setLevel(logging.WARNING)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    _name_process(f"cloob-rank{os.environ.get('RANK', local_rank)}", command)
    return _run_trainer(argv)


def _run_trainer(argv: list[str]) -> int:
    import runpy

    sys.argv = [_MODULE, *argv]
    try:
        runpy.run_module(_MODULE, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as the interpreter ends on an uncaught Ctrl-C
        code = 128 + signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    _finish()
    return code


def _finish() -> None:
    """What the interpreter does at its end: wait for non-daemon threads, run atexit, flush."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _open_fds() -> dict[int, tuple[int, int]]:
    """This process's open file descriptors above 2, each with what it refers to (device, inode)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # the listing's own descriptor, closed by now
            found[fd] = (st.st_dev, st.st_ino)
    return found


def _close_inherited(inherited: dict[int, tuple[int, int]]) -> None:
    """Close what the child inherited above 2, as close_fds does, but not what a library's fork
    handler opened in the child itself: libuv (torch's TCPStore) closes its signal pipe there and
    opens a new one, remembering its numbers; closing that would have its handler close whatever
    this rank later opens under the same numbers, at the fork of its first DataLoader worker."""
    for fd, identity in _open_fds().items():
        if inherited.get(fd) == identity:
            os.close(fd)


def _name_process(short: str, command: list[str]) -> None:
    """The rank's short name (top, ps -o comm) and its command line (ps, /proc/PID/cmdline), which
    would otherwise be the agent's: written over the agent's argument area, which is longer."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, short.encode()[:15], 0, 0, 0)
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49
    except (OSError, ValueError, IndexError, AttributeError):
        return
    if not 0 < start < end:
        return
    text = b"\0".join(a.encode() for a in command)[:end - start - 1]
    ctypes.memmove(start, text.ljust(end - start, b"\0"), end - start)

"""Run a worker's command so that it cannot outlive the worker (Linux).

``CommandJob`` starts ``python -I -S launch.py WORKER_PID COMMAND...`` as the leader
of a new process group. This process asks the kernel to send it SIGTERM when the
worker dies (``PR_SET_PDEATHSIG``, set here, after the fork: no ``preexec_fn`` in a
threaded worker), runs the command as its child in the same group, and on that
signal kills the whole group, the command and anything it started (a pipeline, a
background job), before the runtime leases the task elsewhere. Otherwise it waits
for the command and ends as the command did, exit status or signal.

It imports nothing from bloom_runtime and needs no site-packages, so it starts fast.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEATH_SIGNAL = signal.SIGTERM
EXIT_ORPHANED = 125  # the worker died before we could tie ourselves to it


def _kill_group(signum: int, frame: object) -> None:
    os.killpg(0, signal.SIGKILL)  # this process is in the group too


def main(argv: list[str]) -> int:
    worker_pid, command = int(argv[1]), argv[2:]
    signal.signal(DEATH_SIGNAL, _kill_group)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0) != 0:
        print(f"bloom-runtime launch: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return EXIT_ORPHANED
    if os.getppid() != worker_pid:
        return EXIT_ORPHANED  # the worker died between our fork and the prctl: do not start
    child = os.fork()  # this process has one thread: a plain fork is safe here
    if child == 0:
        try:
            # Python ignores these at start, and an ignored signal stays ignored across exec.
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, DEATH_SIGNAL):
                signal.signal(sig, signal.SIG_DFL)
            os.execv(command[0], command)  # same group, same stdin/stdout/stderr
        except BaseException as exc:
            os.write(2, f"bloom-runtime launch: cannot run {command[0]}: {exc}\n".encode())
        os._exit(127)
    # Hold none of the pipes: the worker sees end-of-file when the command's side closes.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)  # end as the command did: "killed by signal N"
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))

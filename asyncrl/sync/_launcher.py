"""Run a server as a child of this process, and take its whole process group down with it.

    python _launcher.py PARENT_PID CMD...

Started by ``DeploymentManager`` as the leader of a new process group (run by path, so
nothing of asyncrl is imported). vLLM's engine processes do not die with the API server, so
killing only the server's top process would leave gigabytes of orphans; this launcher:

- asks the kernel for SIGTERM when PARENT_PID (the process that started it) dies, even by
  SIGKILL where no atexit hook runs (Linux ``PR_SET_PDEATHSIG``), and then SIGKILLs its group;
- ignores a SIGTERM while the parent lives: that is a stop of the whole group, and the server
  got the same signal and shuts down gracefully;
- when the server exits, for whatever reason, SIGKILLs whatever is left of the group and
  exits with the server's status.
"""

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, cmd = int(sys.argv[1]), sys.argv[2:]

    def orphaned() -> bool:
        return os.getppid() != parent

    def on_sigterm(signum: int, frame: object) -> None:
        if orphaned():
            os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_sigterm)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if orphaned():  # the parent died before the prctl
        os.killpg(0, signal.SIGKILL)
    server = subprocess.Popen(cmd)
    code = server.wait()
    print(
        f"=== asyncrl launcher: server exited with {code}; stopping its process group",
        file=sys.stderr,
        flush=True,
    )
    _kill_rest_of_group()
    sys.exit(code if code >= 0 else 128 - code)  # the server's status, as a shell reports it


def _kill_rest_of_group() -> None:
    """SIGKILL every other process of this group (Linux /proc; elsewhere the whole group)."""
    me, group = os.getpid(), os.getpgid(0)
    if not os.path.isdir("/proc"):
        os.killpg(0, signal.SIGKILL)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            if int(stat[stat.rfind(b")") + 2 :].split()[2]) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


if __name__ == "__main__":
    main()

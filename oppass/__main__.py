"""`python -m oppass` and the `oppass` command: `oppass.cli.main`, imported here with SIGINT held, so that a
Ctrl-C while its modules load (numpy, onnx, onnxruntime: about a second) is said in one line, as it is later."""

import signal
import sys

INTERRUPTED_STATUS = 128 + signal.SIGINT


def run() -> int:
    """Imports the command line and runs it; returns the exit status."""
    holds = hasattr(signal, "pthread_sigmask")  # POSIX
    interrupted = False
    if holds:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        from oppass.cli import main
    finally:
        if holds:
            interrupted = signal.SIGINT in signal.sigpending()
            if interrupted:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the held signal is dropped when released
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        if interrupted:
            raise KeyboardInterrupt
        return main()
    except KeyboardInterrupt:  # held during the imports, or come before `main` put up its handlers
        print("oppass: error: stopped by SIGINT while starting (nothing was written)", file=sys.stderr)
        return INTERRUPTED_STATUS


if __name__ == "__main__":
    sys.exit(run())

"""`accelerate launch`, as run.sh starts the recipes, with two changes:

* SIGTERM or SIGINT sent to this process (run.sh's pid, a job scheduler's or `kill`'s target) is passed on to the
  training process, which stops as after a signal to the whole process group: the stop line, a checkpoint, status
  143 (SIGTERM) or the Ctrl-C line and status 130 (SIGINT). This process waits for it and exits with its status, so
  that no process outlives run.sh. As torchrun does for its workers, the training process runs in a process group of
  its own, so that a Ctrl-C in the terminal reaches it once, through here, not twice.
* Ctrl-C leaves without the launcher's own KeyboardInterrupt traceback: the training process prints what was saved
  and how to resume, which that traceback would only bury.

    python swa_accel/runner/quiet_launch.py launch --config_file ... recipes/vision/train.py ...

(A multi-process launch runs torchrun's agent in this process, which handles the two signals itself in the same
way: it passes them on to its workers, each in a session of its own, and waits for them.)
"""

import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT)


class TrainingProcess(subprocess.Popen):
    """A child of the launcher: started in a process group of its own (unless it asks for a session), and kept in
    `started` so that a signal to the launcher can be passed on to it."""

    started: list["TrainingProcess"] = []

    def __init__(self, *args, **kwargs):
        if not kwargs.get("start_new_session"):
            kwargs.setdefault("process_group", 0)
        super().__init__(*args, **kwargs)
        TrainingProcess.started.append(self)


class Forwarder:
    """Passes the signals it is installed for on to the running children; `received` is the last one."""

    def __init__(self) -> None:
        self.received = None

    def __call__(self, number: int, frame) -> None:
        self.received = number
        if not TrainingProcess.started:  # before the launch: there is nothing to stop but this process
            sys.exit(128 + number)
        for child in TrainingProcess.started:
            if child.poll() is None:
                child.send_signal(number)

    def exit_status(self) -> int:
        """After a passed-on signal: the status of the first child that failed (128 + N for one ended by signal N)."""
        for child in TrainingProcess.started:
            code = child.poll()
            if code:
                return 128 - code if code < 0 else code
        return 128 + self.received


def main() -> None:
    # (accelerate's simple launcher calls subprocess.Popen when it starts the script, so it starts a TrainingProcess)
    subprocess.Popen = TrainingProcess
    forwarder = Forwarder()
    for number in FORWARDED:
        signal.signal(number, forwarder)
    from accelerate.commands.accelerate_cli import main as accelerate_main

    try:
        accelerate_main()
    except SystemExit as error:
        # accelerate launch --quiet ends a failed run with status 1 whatever the script's status; after a passed-on
        # signal the training process's own status (143 after a checkpoint) is the one a job script acts on.
        if forwarder.received is not None and error.code:
            sys.exit(forwarder.exit_status())
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # torchrun's agent after a stop signal: its workers were stopped and waited for
        if type(error).__name__ == "SignalException":
            sys.exit(128 + int(error.sigval))
        raise


if __name__ == "__main__":
    main()

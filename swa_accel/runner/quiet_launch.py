"""`accelerate launch`, ended quietly by Ctrl-C: the training processes print what was saved and how to resume, so
the launcher's own KeyboardInterrupt traceback would only bury that line. run.sh starts the recipes through it:

    python swa_accel/runner/quiet_launch.py launch --config_file ... recipes/vision/train.py ...
"""

import sys

from accelerate.commands.accelerate_cli import main

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)

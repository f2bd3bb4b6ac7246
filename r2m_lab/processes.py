"""Worker processes that do not outlive the run that started them.

A side-by-side fine-tune (``r2m_lab.stages.pipeline.train_side_by_side``) runs in spawned worker processes. When
the pipeline itself is killed (``kill <pid>``, a scheduler's SIGTERM to the main process, the OOM killer), the
pool's workers would otherwise go on training as orphans: burning the cores a restarted run needs and writing
checkpoints beside it. Each worker therefore watches its parent and exits when it is gone; what it trained so far
is in its last training checkpoint (written atomically), from which the next run resumes.
"""

from __future__ import annotations

import os
import threading
import time

POLL_SECONDS = 1.0


def exit_with_parent(parent_pid: int, poll_seconds: float = POLL_SECONDS) -> None:
    """Pool initializer: a daemon thread ends this process (exit status 1) once ``parent_pid`` is no longer its
    parent, i.e. the parent died and the process was re-parented (checked every ``poll_seconds``)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)  # no cleanup in a half-finished fine-tune: its last checkpoint is already whole on disk

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()

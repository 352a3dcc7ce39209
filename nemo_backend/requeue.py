"""Our requeue protocol inside NeMo's trainer: on SIGUSR2 (the time limit ahead) or SIGTERM (preemption,
``scancel``), save a checkpoint at the end of the step and exit 75, which the job script turns into
``scontrol requeue`` within the retry budget (as the native trainer does).

NeMo's ``PreemptionCallback`` does the save for one signal and exits 0 (which would end the job as
COMPLETED); this one listens to both signals and exits with the requeue code. Job side only.
"""

from __future__ import annotations

import contextlib
import signal
import sys

import torch
from nemo.lightning.pytorch.callbacks import PreemptionCallback

from launcher.render import REQUEUE_EXIT_CODE

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class RequeueOnSignal(PreemptionCallback):
    def __init__(self):
        super().__init__(sig=signal.SIGUSR2)

    @contextlib.contextmanager
    def _preemption_handler(self):
        if not self.preemption_supported:
            yield
            return
        originals = {s: signal.getsignal(s) for s in SIGNALS}

        def handler(signum, frame):
            self._interrupted = True

        try:
            for s in SIGNALS:  # every rank listens: the job script signals the ranks, not only rank 0
                signal.signal(s, handler)
            yield
        finally:
            for s, h in originals.items():
                signal.signal(s, h)

    @property
    def interrupted(self) -> bool:
        """True when any rank was signalled (NeMo's asks rank 0 only, and only on a GPU)."""
        if not self.preemption_supported:
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        flag = torch.tensor(int(self._interrupted), device=device, dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.interrupted:
            return
        trainer.should_stop = True
        if trainer.checkpoint_callback:
            monitor_candidates = trainer.checkpoint_callback._monitor_candidates(trainer)
            trainer.checkpoint_callback._save_last_checkpoint(trainer, monitor_candidates)
            finalize = getattr(trainer.strategy.checkpoint_io, "maybe_finalize_save_checkpoint", None)
            if finalize is not None:
                finalize(blocking=True)
        sys.exit(REQUEUE_EXIT_CODE)

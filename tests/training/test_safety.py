"""SIGTERM becomes a flag the loop reads (then a clean save and exit 0); a non-finite loss becomes a one-line error."""

import os
import signal
import time

import pytest
import torch

from mytune.errors import MytuneError
from mytune.training.safety import PreemptionHandler, check_finite


def wait_for(condition, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_sigterm_to_own_process_sets_the_flag_and_uninstall_restores():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as handler:
        assert not handler.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: handler.should_stop)  # and the process is still alive
        assert handler.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_check_finite():
    check_finite(1.5, step=3)
    check_finite(torch.tensor(0.0), step=3)
    with pytest.raises(MytuneError) as err:
        check_finite(torch.tensor(float("nan")), step=7, last_checkpoint="out/step_5", lr=2e-4)
    message = str(err.value)
    assert message == ("loss is nan at step 7: training diverged; lower lr (now 0.0002) or set max_grad_norm; "
                       "the last good checkpoint is out/step_5")
    with pytest.raises(MytuneError, match=r"^loss is inf at step 1: .*no checkpoint was saved before it$"):
        check_finite(float("inf"), step=1)

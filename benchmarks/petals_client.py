"""Runs shared/petals-peer/bench_petals.py inside Petals' own venv, with one fix to Petals' client: when the
garbage collector finalizes an unclosed server session on hivemind's event-loop thread, Petals' finalizer waits
on that very loop and the client hangs; here it only schedules the close. Used by hotpath.py."""

import asyncio
import runpy
import sys
import threading
from pathlib import Path

from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from petals.client.inference_session import _ServerInferenceSession

finalize = _ServerInferenceSession.__del__


def finalize_without_deadlock(session) -> None:
    if threading.current_thread() is RemoteExpertWorker._event_thread:
        if getattr(session, "_outputs_stream", None) is not None:
            asyncio.get_event_loop().create_task(session._aclose_stream())
        return
    finalize(session)


_ServerInferenceSession.__del__ = finalize_without_deadlock
script = Path(sys.argv[1])
sys.argv = [str(script)]
runpy.run_path(str(script), run_name="__main__")

"""kill -9 in the middle of an association loses nothing that was acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from conftest import free_port, small_phantom, start_serve, wait_for
from radfinder_node.database import Database
from radfinder_node.models import Instance, Series, SeriesState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_node(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        "RADFINDER_QUIET_PERIOD_S": "1",
        "RADFINDER_COMPLETION_POLL_S": "0.2",
        "RADFINDER_HL7_PORT": "0",  # free ports: parallel nodes must not fight over 2575/8080
        "RADFINDER_HTTP_PORT": "0",
    }
    ae = AE()
    ae.add_requested_context(Verification)

    def answers() -> bool:
        assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER")
        ok = assoc.is_established and assoc.send_c_echo().Status == 0
        if assoc.is_established:
            assoc.release()
        return bool(ok)

    args = ("--port", str(port), "--ae-title", "RADFINDER")
    return start_serve(data_dir, *args, env=env, ready=answers, timeout=30)


def test_kill9_mid_association_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    from dicom_io.synthetic import ct_datasets

    hu, spacing = small_phantom(slices=400, size=64)
    datasets = list(ct_datasets(hu, spacing))
    data_dir, port = tmp_path / "data", free_port()
    proc = start_node(data_dir, port)

    acknowledged: list[str] = []
    killed = threading.Event()

    def killer() -> None:
        wait_for(lambda: len(acknowledged) >= 60, timeout=60, interval=0.001)
        os.kill(proc.pid, signal.SIGKILL)  # asynchronously, while a C-STORE is in flight
        killed.set()

    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFINDER")
    assert assoc.is_established
    threading.Thread(target=killer, daemon=True).start()
    for ds in datasets:
        if not assoc.is_established:
            break
        status = assoc.send_c_store(ds)
        if status and status.Status == 0x0000:
            acknowledged.append(str(ds.SOPInstanceUID))
        else:
            break
    proc.wait(timeout=10)
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    assert 60 <= len(acknowledged) < len(datasets)

    proc = start_node(data_dir, port)  # restart: migrations are idempotent, state resumes
    try:
        db = Database(f"sqlite:///{data_dir / 'radfinder.db'}")
        with db.transaction() as s:
            rows = {r.sop_uid: r.path for r in s.scalars(select(Instance)).all()}
        for uid in acknowledged:
            assert uid in rows, f"acknowledged {uid} missing from the database"
            stored = pydicom.dcmread(data_dir / "spool" / rows[uid])
            assert stored.SOPInstanceUID == uid
        assert not list((data_dir / "spool").rglob("*.tmp"))

        def decided() -> bool:
            with db.transaction() as s:
                return s.scalar(select(Series.state)) == SeriesState.SELECTED

        assert wait_for(decided, timeout=20)
        db.dispose()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0

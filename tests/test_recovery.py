"""After an unclean stop, spool files whose rows were lost are filed again."""

from __future__ import annotations

from collections.abc import Callable

import pydicom
from sqlalchemy import delete, func, select

from conftest import wait_for
from radfinder_node.models import Instance
from radfinder_node.node import Node
from radfinder_node.status import node_status
from test_listener import associate


def test_unclean_stop_reindexes_spool_files_without_rows(
    make_node: Callable[..., Node], chest_series
) -> None:  # type: ignore[no-untyped-def]
    node = make_node(quiet_period_s=30)
    assoc = associate(node)
    for path in chest_series.paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    data_dir = node.settings.data_dir
    # what a power loss can do to SQLite in WAL/NORMAL mode: the last commits vanish
    lost = chest_series.sop_uids[-7:]
    with node.db.transaction() as s:
        s.execute(delete(Instance).where(Instance.sop_uid.in_(lost)))
    node.stop()
    (data_dir / "node.running").write_text("1")  # ... and no clean stop

    restarted = make_node(data_dir=data_dir, quiet_period_s=30)
    with restarted.db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 24
        rows = s.scalars(select(Instance).where(Instance.sop_uid.in_(lost))).all()
    assert sorted(r.sop_uid for r in rows) == sorted(lost)
    assert all(r.instance_number for r in rows)
    assert wait_for(lambda: node_status(restarted.db)["instances"] == 24)
    restarted.stop()
    assert not (data_dir / "node.running").exists()

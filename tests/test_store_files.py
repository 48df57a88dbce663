"""The store's files on disk."""

from __future__ import annotations

from gateway.store import Store


async def test_the_store_files_are_readable_by_their_owner_only(tmp_path):
    """The outbox holds the plant's production data: the database, its WAL and shared-memory files and the lock are
    created 0600 whatever the umask (red before: 0644)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        async with Store(str(tmp_path / "gw.db")) as store:
            await store.commit({"m1": {"v": 1}}, [], 1)
            for name in ("gw.db", "gw.db-wal", "gw.db-shm", "gw.db.lock"):
                mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
                assert mode == 0o600, (name, oct(mode))
    finally:
        os.umask(old)

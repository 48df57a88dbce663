"""Standalone SQLite replay of the store's write load at the Node-RED peer's 10,000 tags @ 1 s (667 reports/s), for
comparing ways of storing machine states (a developer's tool: no gateway, no aiosqlite, plain sqlite3).

    .venv/bin/python bench/store_replay.py upsert|log [SECONDS]

Per simulated second two commits (synchronous=FULL), each of 333 machine states (560 B, random machines of 3,333)
and 333 outbox rows (~1,050 B), and after each an ack transaction (synchronous=NORMAL) deleting its rows, as
gateway/store.py does. ``upsert``: the states upserted into ``machine_state`` (the store's way); ``log``: appended to
a ``state_log`` table and folded into ``machine_state`` every 15 s. Prints the CPU (user + system) per simulated
second. bench/README.md, "eighth session": the log costs more (7.2 against 6.2 ms). ``WAL_AUTOCHECKPOINT=N`` sets
SQLite's ``wal_autocheckpoint`` (default 1000 pages; "ninth session": 10,000 changed nothing). Tenth session's knobs
(bench/README.md): ``PACE_S=0.5`` sleeps that long before each simulated second (the commits come in bursts on an
otherwise idle CPU, as in the gateway), ``ORDER=contiguous`` takes the machines of a commit from one stretch of the
table instead of at random, ``MMAP_SIZE=N`` sets SQLite's ``mmap_size``, ``WITHOUT_ROWID=1`` makes ``machine_state`` a
WITHOUT ROWID table."""
import os
import random
import resource
import sqlite3
import sys
import tempfile
import time

N_MACH, COMMITS, SECONDS = 3333, int(os.environ.get("COMMITS_PER_S", "2")), int(sys.argv[2]) if len(sys.argv) > 2 else 40
PER_COMMIT = 667 // COMMITS  # 667 reports per simulated second
mode = sys.argv[1]
path = os.path.join(tempfile.mkdtemp(prefix="store-replay-"), f"{mode}.db")
for suffix in ("", "-wal", "-shm"):
    try: os.unlink(path + suffix)
    except FileNotFoundError: pass
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL"); db.execute("PRAGMA temp_store=MEMORY")
db.execute(f"PRAGMA mmap_size={int(os.environ.get('MMAP_SIZE', '0'))}")
db.execute(f"PRAGMA wal_autocheckpoint={int(os.environ.get('WAL_AUTOCHECKPOINT', '1000'))}")  # SQLite's default: 1000
WITHOUT_ROWID = " WITHOUT ROWID" if os.environ.get("WITHOUT_ROWID") else ""
db.executescript(f"""
CREATE TABLE machine_state (machine TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL){WITHOUT_ROWID};
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, machine TEXT NOT NULL,
  type TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE state_log (id INTEGER PRIMARY KEY, machine TEXT NOT NULL, state TEXT NOT NULL);
""")
machines = [f"m{i:05d}" for i in range(N_MACH)]
state = "x" * 560; payload = b"y" * 950
db.execute("BEGIN"); db.executemany("INSERT INTO machine_state VALUES (?, ?, ?)", [(m, state, 0.0) for m in machines]); db.execute("COMMIT")
rnd = random.Random(1); seq = 0; pending: list[int] = []
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.monotonic()
PACE_S = float(os.environ.get("PACE_S", "0"))
for sec in range(SECONDS):
    if PACE_S:
        time.sleep(PACE_S)
    for _ in range(COMMITS):
        if os.environ.get("ORDER", "random") == "contiguous":
            start = (sec * COMMITS + _) * PER_COMMIT % N_MACH
            batch = (machines[start:] + machines[:start])[:PER_COMMIT]
        else:
            batch = sorted(rnd.sample(machines, PER_COMMIT))
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        if mode == "upsert":
            db.executemany("INSERT INTO machine_state(machine, state, updated) VALUES (?, ?, ?) ON CONFLICT(machine) "
                           "DO UPDATE SET state=excluded.state, updated=excluded.updated", [(m, state, 1.0) for m in batch])
        else:
            db.executemany("INSERT INTO state_log(machine, state) VALUES (?, ?)", [(m, state) for m in batch])
        rows = []
        for m in batch:
            seq += 1; rows.append((seq, m, "operation.quantity_reported", f"edge/v1/a/b/c/d/{m}/events/operation.quantity_reported", payload, 1.0))
        db.executemany("INSERT INTO outbox(seq, machine, type, topic, payload, created) VALUES (?, ?, ?, ?, ?, ?)", rows)
        last = db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()[0]
        db.execute("COMMIT")
        ids = list(range(last - PER_COMMIT + 1, last + 1))
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))}) RETURNING LENGTH(payload)", chunk).fetchall()
        db.execute("COMMIT")
    if mode == "log" and sec % 15 == 14:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO machine_state(machine, state, updated) SELECT machine, state, 2.0 FROM state_log "
                   "WHERE id IN (SELECT MAX(id) FROM state_log GROUP BY machine) "
                   "ON CONFLICT(machine) DO UPDATE SET state=excluded.state, updated=excluded.updated")
        db.execute("DELETE FROM state_log")
        db.execute("COMMIT")
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(f"{mode}: {cpu * 1000 / SECONDS:.1f} ms CPU per simulated second (user {1000*(r1.ru_utime-r0.ru_utime)/SECONDS:.1f}, "
      f"sys {1000*(r1.ru_stime-r0.ru_stime)/SECONDS:.1f}), wall {time.monotonic()-t0:.1f} s")

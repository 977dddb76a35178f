"""Several Store instances appending at once still build one contiguous, valid chain.

Each Store has its own engine and connection pool, standing in for separate worker
processes and replicas sharing the database.
"""

from __future__ import annotations

import threading

from meshca.store import Store

from .helpers import issuance

STORES = 4
THREADS = 8
ROUNDS = 6  # each round: one single append and one group commit of three


def test_concurrent_appends_form_one_chain(store: Store, database_url: str) -> None:
    stores = [Store(database_url) for _ in range(STORES)]
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    sequences: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        mine = stores[t % STORES]
        barrier.wait()
        try:
            for r in range(ROUNDS):
                n = (t * ROUNDS + r) * 4
                rows = [mine.append_issuance(issuance(n))]
                rows += mine.append_issuances([issuance(n + k) for k in (1, 2, 3)])
                got = [row.sequence for row in rows]
                assert got[1:] == list(range(got[1], got[1] + 3)), "a group commit was split"
                with lock:
                    sequences.extend(got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for s in stores:
        s.close()

    assert errors == []
    total = THREADS * ROUNDS * 4
    assert sorted(sequences) == list(range(1, total + 1))
    report = store.verify_ledger()
    assert report.ok, report.problems
    assert report.rows_checked == report.head_sequence == total

"""Subprocess helper for ``tests/test_leveldb.py`` (run as a script, never collected).

``work PATH N``: enqueue N jobs, then stream and complete (or fail once) them,
printing ``done <id>`` / ``failed <id>`` after each call returns, until killed.
``hold PATH``: open the store, print ``open``, keep it open until stdin closes.
``try PATH``: try to open the store; print ``opened`` or ``error <Type>: <message>``.
"""

from __future__ import annotations

import asyncio
import sys

from jobpool_async import Job, PoolQueue
from jobpool_async.backends.leveldb import LevelDBBackend


def payload(i: int) -> bytes:
    return bytes(range(256)) + f"def-{i}".encode()


def number(job_id: str) -> int:
    return int(job_id.split("-")[1])


def result_for(job_id: str) -> bytes:
    return f"result-{job_id}".encode() + b"\x00\xff"


async def work(path: str, n: int) -> None:
    async with PoolQueue(LevelDBBackend(path)) as queue:
        for start in range(0, n, 500):
            await queue.enqueue_jobs(
                [
                    Job(
                        id=f"job-{i}",
                        job_type="t",
                        job_definition=payload(i),
                        tags=[f"g{i % 3}", "all"],
                    )
                    for i in range(start, min(n, start + 500))
                ]
            )
        print("enqueued", flush=True)
        async with queue.stream_jobs("child", max_assigned_jobs=50) as stream:
            async for batch in stream:
                fails = {
                    j.id: "boom"
                    for j in batch
                    if j.retry_count == 0 and int(j.id.split("-")[1]) % 5 == 0
                }
                done = {j.id: result_for(j.id) for j in batch if j.id not in fails}
                if fails:
                    await queue.fail_jobs(fails)
                    print("\n".join(f"failed {i}" for i in fails), flush=True)
                if done:
                    await queue.complete_jobs(done)
                    print("\n".join(f"done {i}" for i in done), flush=True)


async def hold(path: str) -> None:
    backend = LevelDBBackend(path)
    await backend.open()
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await backend.close()


async def try_open(path: str) -> None:
    backend = LevelDBBackend(path)
    try:
        await backend.open()
    except Exception as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
    else:
        print("opened", flush=True)
        await backend.close()


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "work":
        asyncio.run(work(path, int(sys.argv[3])))
    elif mode == "hold":
        asyncio.run(hold(path))
    elif mode == "try":
        asyncio.run(try_open(path))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()

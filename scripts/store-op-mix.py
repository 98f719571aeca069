"""Time a discovery store's basic operations on a real Redis or etcd (no discovery server involved).

    python scripts/store-op-mix.py --store etcd://127.0.0.1:2379 [--keeps 2000] [--concurrency 50]

Registers students, keeps their leases (one after another, then ``--concurrency`` at a time),
reads the service and writes its assignment. ``--impl FILE`` loads the store class from another
file instead (e.g. the etcd3gw store of an older commit, to compare:
``git show 1279d9a:src/distill_reader/discovery/stores/etcd.py > /tmp/etcd_gateway.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
import uuid

from distill_reader.discovery.stores import open_discovery_store, parse_store_url


def load_store(url: str, impl: str | None):
    if not impl:
        return open_discovery_store(url)
    spec = importlib.util.spec_from_file_location("store_impl", impl)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parsed = parse_store_url(url)
    cls = module.EtcdStore if parsed.kind == "etcd" else module.RedisStore
    return cls(parsed.host, parsed.port)


async def timed(label: str, n: int, coros) -> None:
    t0 = time.perf_counter()
    await coros()
    dt = time.perf_counter() - t0
    print(f"{label:<34} {n:>6} ops  {dt:7.2f} s  {n / dt:9.0f} ops/s  {dt / n * 1e3:7.3f} ms/op")


async def main(args: argparse.Namespace) -> None:
    store = load_store(args.store, args.impl)
    await store.start()
    svc = f"mix-{uuid.uuid4().hex[:6]}"
    students = [f"s{i}" for i in range(args.students)]
    leases: dict[str, str] = {}

    async def register():
        for s in students:
            leases[s] = await store.register("student", svc, s, "i", {"require_num": 2}, 10)

    async def keep_serial():
        for i in range(args.keeps):
            s = students[i % len(students)]
            assert await store.keep("student", svc, s, leases[s], 10)

    async def keep_concurrent():
        sem = asyncio.Semaphore(args.concurrency)

        async def one(i: int):
            async with sem:
                s = students[i % len(students)]
                assert await store.keep("student", svc, s, leases[s], 10)

        await asyncio.gather(*(one(i) for i in range(args.keeps)))

    async def read():
        for _ in range(args.reads):
            state = await store.read(svc)
            assert len(state.students) == len(students)

    async def write():
        version = (await store.read(svc)).version
        for i in range(args.reads):
            assignment = {s: [f"127.0.0.1:{9000 + (i + j) % 7}"] for j, s in enumerate(students)}
            assert await store.write_assignment(svc, version, assignment)
            version = (await store.read(svc)).version

    await timed("register", len(students), register)
    await timed("keep, one after another", args.keeps, keep_serial)
    await timed(f"keep, {args.concurrency} at a time", args.keeps, keep_concurrent)
    await timed(f"read ({len(students)} students)", args.reads, read)
    await timed("write_assignment (+ read)", args.reads, write)
    for s in students:
        await store.drop("student", svc, s, leases[s])
    await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--impl", default=None, help="load EtcdStore/RedisStore from this file instead")
    parser.add_argument("--students", type=int, default=200)
    parser.add_argument("--keeps", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    asyncio.run(main(parser.parse_args()))

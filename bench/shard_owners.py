"""Which replica owns which resource of bench/cluster.sh's routes (resource "r:{id}").

    shard_owners.py ADMIN_PORT REPLICAS --find REPLICA   the first id k0, k1, ... that REPLICA owns
    shard_owners.py ADMIN_PORT REPLICAS ID...            "owner id", one line per id

Waits (up to 30 s) until exactly REPLICAS live replicas own every shard between them, reading
GET /v1/cluster; the shard of a resource is FNV-1a 64 of its name modulo the shard count.
"""
import json
import sys
import time
import urllib.request


def fnv(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h


def settled_owners(admin, replicas):
    for _ in range(300):
        view = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/v1/cluster"))
        owners = [s["owner"] for s in view["shards"]]
        live = {r["replica"] for r in view["replicas"] if r["alive"]}
        if all(owners) and set(owners) == live and len(live) == replicas:
            return owners
        time.sleep(0.1)
    sys.exit("shards never settled")


def owner(owners, resource_id):
    return owners[fnv(f"r:{resource_id}".encode()) % len(owners)]


admin, replicas, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
owners = settled_owners(admin, replicas)
if rest[:1] == ["--find"]:
    print(next(f"k{i}" for i in range(100000) if owner(owners, f"k{i}") == rest[1]))
else:
    for resource_id in rest:
        print(owner(owners, resource_id), resource_id)

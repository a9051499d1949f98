#!/usr/bin/env python3
"""Writes the demo's seed.sql and cluster-snapshot.json: a centaur bare-pod deployment (the
default controller) with the backlog the reconciler exists for.

Objects are named as centaur names them, centaur-centaur-sandbox-<slug>-<sha10>: the slug is
the thread key made DNS-safe, the sha10 the first ten hex digits of its SHA-256. Run it after
changing the mix:  python3 examples/demo/generate.py
"""
import hashlib
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def object_name(thread_key):
    slug = re.sub(r"[^a-z0-9]+", "-", thread_key.lower()).strip("-")[:30].strip("-")
    sha10 = hashlib.sha256(thread_key.encode()).hexdigest()[:10]
    return f"centaur-centaur-sandbox-{slug}-{sha10}"


# (channel, count, state, age as an SQL interval, pod: None | "running" | "terminating", comment)
MIX = [
    ("C01", 30, "running", "5 minutes", "running", "live sessions whose pods exist"),
    ("C02", 10, "idle", "2 hours", "running", None),
    ("C03", 5, "delivering", "1 minute", "running", None),
    ("C06", 40, "suspended", "1 day {i} hours", None,
     "the backlog: suspended sessions whose pods were deleted by pause (orphans)"),
    ("C08", 3, "suspended", "2 minutes", None,
     "suspended a moment ago: inside the grace period, left alone"),
    ("C09", 1, "suspended", "1 hour", "terminating",
     "suspended, pod still terminating: not absent yet"),
    ("C10", 80, "gone", "30 days", None, "history: gone, stopped, error, creating"),
    ("C11", 1, "stopped", "4 days", None, None),
    ("C12", 1, "error", "4 hours", None, None),
    ("C13", 1, "creating", "10 seconds", "running", None),
]

LEAKED = 3  # labelled pods no session refers to (untracked)


def main():
    sql = [
        "-- Demo data for scripts/demo.sh, written by examples/demo/generate.py: centaur's",
        "-- sandbox_sessions as its migrations leave it, on a bare-pod deployment, with the",
        "-- backlog of suspended sessions whose pods are gone. Recreated on every run.",
        "DROP TABLE IF EXISTS sandbox_sessions;",
        "DROP TABLE IF EXISTS sandbox_reconciler_audit;",
        "DROP TABLE IF EXISTS sandbox_reconciler_audit_migrations;",
        "\\ir ../../crates/testkit/fixtures/centaur_sandbox_sessions_migrated.sql",
    ]
    items = []
    for channel, count, state, age, pod, comment in MIX:
        if comment:
            sql.append(f"-- {comment}")
        values = []
        for i in range(1, count + 1):
            key = f"slack:{channel}:{i}"
            name = object_name(key)
            interval = age.replace("{i}", str(i))
            thread = f"'T-{channel}-{i}'" if state != "gone" else "NULL"
            values.append(
                f"  ('{key}', '{name}', '{state}', now() - interval '{interval}', {thread})"
            )
            if pod:
                meta = {
                    "name": name,
                    "namespace": "agents",
                    "uid": "uid-" + hashlib.sha256(name.encode()).hexdigest()[:12],
                    "labels": {"centaur.ai/managed": "true", "centaur.ai/sandbox-id": name},
                }
                if pod == "terminating":
                    meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                items.append(pod_item(meta))
        sql.append(
            "INSERT INTO sandbox_sessions (thread_key, sandbox_id, state, updated_at, agent_thread_id) VALUES\n"
            + ",\n".join(values)
            + ";"
        )
    for i in range(1, LEAKED + 1):
        name = object_name(f"leaked:{i}")
        items.append(pod_item({
            "name": name,
            "namespace": "agents",
            "uid": f"uid-leaked-{i}",
            "labels": {"centaur.ai/managed": "true", "centaur.ai/sandbox-id": name},
        }))
    with open(os.path.join(HERE, "seed.sql"), "w") as f:
        f.write("\n".join(sql) + "\n")
    snapshot = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}
    with open(os.path.join(HERE, "cluster-snapshot.json"), "w") as f:
        json.dump(snapshot, f, indent=1)
        f.write("\n")


def pod_item(meta):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "agent", "image": "centaur/agent:latest"}]},
        "status": {"phase": "Running"},
    }


if __name__ == "__main__":
    main()

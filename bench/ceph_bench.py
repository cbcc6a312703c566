"""Ceph RBD numbers for docs/benchmarks.md (issue 18), on a real single-node cluster.

    sudo python bench/ceph_bench.py [--runs 3] [--json]     # about 4 minutes

Needs Debian's ceph-mon/ceph-mgr/ceph-osd and the rados/rbd bindings visible to this
Python (``python -m vmreclaim.testing.ceph link-bindings``). Measures, in one run:

* cluster start: nothing to a usable ``rbd`` pool (``vmreclaim.testing.ceph``), and the
  daemons' resident memory once the guests are done;
* delete→freed in a TCG guest whose data disk is an RBD image held by QEMU's rbd driver
  (4 × 16 MiB files written and deleted while a checker verifies its own): the guest's
  ``fstrim`` with discard=unmap, and ``vmreclaim image sparsify rbd:...`` once the VM
  is stopped (``rbd du`` before and after);
* what it costs the cluster: the daemons' CPU seconds over each whole run (the guest's
  writes, deletes and the reclaim), from ``/proc``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ceph_scenario import rbd_guest_scenario

from vmreclaim.testing.ceph import start_cluster
from vmreclaim.testing.guest import build_kit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="guest runs per mode")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmr-ceph-bench-") as tmp:
        root = Path(tmp)
        kit = build_kit(root / "kit")
        cluster = start_cluster(root / "cluster")
        try:
            rows = []
            for i in range(args.runs):
                for mode in ("fstrim", "sparsify"):
                    target = 0.9 if mode == "fstrim" else 0.99
                    run = rbd_guest_scenario(
                        kit, cluster, root / f"{mode}{i}", mode=mode, n_files=4, file_mib=16, target=target
                    )
                    rows.append(run.to_json())
            time.sleep(2)
            doc = {"cluster_start_seconds": round(cluster.start_seconds, 2), "rss_bytes": cluster.rss_bytes(),
                   "runs": rows}
        finally:
            cluster.stop()
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"cluster start: {doc['cluster_start_seconds']} s; RSS MiB: "
          + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in doc["rss_bytes"].items()))
    print("| how | deleted MiB | freed MiB | freed | delete→freed s | cluster CPU s | checker | e2fsck |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        how = "guest fstrim, discard=unmap"
        if r["mode"] == "sparsify":
            how = "vmreclaim image sparsify (VM stopped)"
        secs = r["latency_seconds"] if r["mode"] == "fstrim" else r["sparsify_seconds"]
        print(f"| {how} | {r['deleted_bytes'] / 2**20:.1f} | {r['freed_bytes'] / 2**20:.1f} | "
              f"{100 * r['freed_bytes'] / r['deleted_bytes']:.1f} % | "
              f"{'-' if secs is None else f'{secs:.2f}'} | {r['cluster_cpu_seconds']:.1f} | "
              f"{'ok' if r['checker']['failures'] == 0 else 'FAILED'} | "
              f"{'clean' if r['fsck_clean'] else 'ERRORS'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

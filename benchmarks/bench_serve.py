"""Latency of `spinefrac serve`: seconds from a study's last instance received to its results sent.

    python -m benchmarks.bench_serve --model MODEL_DIR [--studies-dir DIR | --studies 3] [--quiet 5] [--poll 1]
                                     [--gap 0] [--work DIR]

In this process: a node (spinefrac.serve.ServeNode) on a free loopback port with the model folder, and a
destination SCP (pynetdicom) that counts the SR and SC objects it receives. Each study is sent to the node with
the node's own SCU (spinefrac.serve.scu.send_files: one association, every file in its own transfer syntax), one
after the other, `--gap` seconds apart. When every study is done, per study: instances, the seconds its send took,
`latency_s` and `predict_s` from OUT/serve_log.csv, and the rest (latency - quiet time - predict: the wait for the
next poll, staging, writing the SR and SC, the send). Without --studies-dir, full-size synthetic studies are
written first (512 px, about 300 slices, JPEG Lossless; as benchmarks/bench_predict_speed.py). Quote the figures
beside `python -m benchmarks.bench_backends` run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import pandas as pd

from benchmarks.bench_predict_speed import _synthesize
from data_prep.runs.config import load_config

NODE_AE, SENDER_AE, DESTINATION_AE = "SPINEFRAC", "BENCHSCU", "BENCHPACS"
SR_MODALITY = "SR"
WAIT_LIMIT_S = 1800.0
"""Give up when the studies are not all done after this long."""
POLL_S = 0.5


class _Destination:
    """A loopback C-STORE SCP counting what the node sends, by modality."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title=DESTINATION_AE)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:
        modality = str(event.dataset.get("Modality", "?"))
        with self.lock:
            self.counts[modality] = self.counts.get(modality, 0) + 1
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run the node, send the studies, print the latency of each; return 0 when every study was done."""
    from spinefrac.serve import ServeNode
    from spinefrac.serve.scu import send_files

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder (e.g. demo_out/model)")
    ap.add_argument("--studies-dir", type=Path, default=None, help="folder of study folders to send")
    ap.add_argument("--studies", type=int, default=3, help="studies sent (synthesised when no --studies-dir)")
    ap.add_argument("--quiet", type=float, default=5.0, help="worker.quiet_seconds (s)")
    ap.add_argument("--poll", type=float, default=1.0, help="worker.poll_seconds (s)")
    ap.add_argument("--gap", type=float, default=0.0, help="seconds between the end of one send and the next")
    ap.add_argument("--work", type=Path, default=Path("bench_out/serve"), help="spool, out and results.json")
    args = ap.parse_args(argv)

    studies_dir = args.studies_dir or _synthesize(args.work, args.studies)
    studies = sorted(p for p in studies_dir.iterdir() if p.is_dir())[:args.studies]
    for sub in ("spool", "out"):
        shutil.rmtree(args.work / sub, ignore_errors=True)
    destination = _Destination()
    config = load_config("serve", None, [
        f"node.ae_title={NODE_AE}", "node.port=0", f"paths.spool={args.work / 'spool'}",
        f"paths.out={args.work / 'out'}", f"paths.model={args.model}", f"worker.quiet_seconds={args.quiet}",
        f"worker.poll_seconds={args.poll}", f"destination.ae_title={DESTINATION_AE}", "destination.host=127.0.0.1",
        f"destination.port={destination.port}"])
    sent_s: dict[str, float] = {}
    try:
        with ServeNode(config) as node:
            target = {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node.port, "timeout_s": 60.0}
            for study in studies:
                files = sorted(p for p in study.iterdir() if p.is_file())
                t = time.perf_counter()
                send_files(files, calling_ae=SENDER_AE, destination=target)
                sent_s[study.name] = time.perf_counter() - t
                time.sleep(args.gap)
            log_csv = args.work / "out" / "serve_log.csv"
            deadline = time.monotonic() + WAIT_LIMIT_S
            while time.monotonic() < deadline:
                if log_csv.is_file():
                    log = pd.read_csv(log_csv, dtype={"study": str})
                    if len(log) == len(studies) and log["status"].isin(["done", "failed"]).all():
                        break
                time.sleep(POLL_S)
    finally:
        destination.close()
    log = pd.read_csv(args.work / "out" / "serve_log.csv", dtype={"study": str}).set_index("study")
    rows = []
    for study in studies:
        r = log.loc[study.name]
        rows.append({"study": study.name, "instances": int(r["instances"]), "send_s": round(sent_s[study.name], 2),
                     "status": r["status"], "latency_s": float(r["latency_s"]), "predict_s": float(r["predict_s"]),
                     "rest_s": round(float(r["latency_s"]) - args.quiet - float(r["predict_s"]), 2)})
    result = {"quiet_s": args.quiet, "poll_s": args.poll, "gap_s": args.gap, "model": str(args.model),
              "studies": rows, "received": dict(destination.counts),
              "median_latency_s": statistics.median(r["latency_s"] for r in rows)}
    (args.work / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{'study':<34} {'inst':>5} {'send s':>7} {'latency s':>10} {'predict s':>10} {'rest s':>7}")
    for r in rows:
        print(f"{r['study']:<34} {r['instances']:>5} {r['send_s']:>7.2f} {r['latency_s']:>10.2f} "
              f"{r['predict_s']:>10.2f} {r['rest_s']:>7.2f}  {r['status']}")
    print(f"quiet {args.quiet:g} s, poll {args.poll:g} s: median latency {result['median_latency_s']:.2f} s; "
          f"the destination received {result['received']}")
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

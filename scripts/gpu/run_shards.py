#!/usr/bin/env python3
"""Run one GPU check script over disjoint case subsets in parallel processes and combine.

A cold Triton cache makes the kernel checks (``check_mamba2_torch.py``,
``check_falcon_h1_hf_parity.py``) spend most of a device call compiling autotuned kernels, one
``ptxas`` at a time; cases that need different kernels (or specialisations) compile in
parallel when they run in separate processes (the machine has 16 cores; the processes share
the Triton cache). Each shard runs ``COMMAND... --cases SHARD --out OUT.shardK.json``; this
script then writes OUT: the provenance of the job, per shard its cases, exit status, time and
report summary, the shards' summaries combined (counts added, name lists joined) and ``pass``,
true only if every shard exited 0 and wrote its report. Exit status 0 only then.

    python3 scripts/gpu/run_shards.py --out r/mamba.json \\
        --shards "conv_plain,conv_seq_idx;scan_basic" -- python3 scripts/gpu/check_mamba2_torch.py

The shard reports stay beside OUT; the combined file names them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from provenance import provenance  # noqa: E402  (scripts/lib: commit, dirty tree, versions)


def parse_shards(text: str) -> list[list[str]]:
    """``"a,b;c"`` -> ``[["a", "b"], ["c"]]``; a case may appear in one shard only."""
    shards = [[c.strip() for c in part.split(",") if c.strip()] for part in text.split(";")]
    shards = [s for s in shards if s]
    if not shards:
        raise ValueError("--shards: no cases given (e.g. 'case_a,case_b;case_c')")
    seen: set[str] = set()
    for shard in shards:
        repeated = seen.intersection(shard)
        if repeated:
            raise ValueError(f"--shards: {sorted(repeated)} in more than one shard")
        seen.update(shard)
    return shards


def combine_summaries(summaries: list[dict]) -> dict:
    """Add the integer counts of the shards' summaries, join their lists, AND their booleans."""
    out: dict = {}
    for summary in summaries:
        for key, value in summary.items():
            if isinstance(value, bool):
                out[key] = out.get(key, True) and value
            elif isinstance(value, int):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, list):
                out[key] = out.get(key, []) + value
    return out


def shard_out(out: Path, index: int) -> Path:
    """Report path of shard ``index`` (1-based) beside the combined report."""
    return out.with_name(f"{out.stem}.shard{index}{out.suffix}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="combined JSON report to write")
    parser.add_argument("--shards", required=True, help="case lists: 'a,b;c,d' (';' splits)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the check's command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the check's command after --")
    try:
        shards = parse_shards(args.shards)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    procs = []
    for i, cases in enumerate(shards, 1):
        report = shard_out(out, i)
        log = open(report.with_suffix(".log"), "w")  # noqa: SIM115 (closed below)
        cmd = [*command, "--cases", ",".join(cases), "--out", str(report)]
        procs.append((cases, report, cmd, log, subprocess.Popen(cmd, stdout=log, stderr=log)))
    records = []
    for cases, report, cmd, log, proc in procs:
        rc = proc.wait()
        log.close()
        rec: dict = {
            "cases": cases,
            "command": cmd,
            "exit_status": rc,
            "seconds": round(time.time() - t0, 1),
            "report": report.name,
            "log": report.with_suffix(".log").name,
        }
        try:
            rec["summary"] = json.loads(report.read_text()).get("summary", {})
        except (OSError, ValueError) as exc:
            rec["summary"] = None
            rec["problem"] = f"no readable report: {exc}"
        records.append(rec)
        print(f"shard {report.name}: exit {rc}, {rec['summary']}", flush=True)

    passed = all(r["exit_status"] == 0 and r["summary"] is not None for r in records)
    combined = {
        "script": "scripts/gpu/run_shards.py",
        **provenance(sys.argv if argv is None else ["run_shards.py", *argv]),
        "sharded_command": command,
        "shards": records,
        "summary": combine_summaries([r["summary"] for r in records if r["summary"]]),
        "pass": passed,
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(combined, indent=1) + "\n")
    tmp.replace(out)
    print(f"pass={passed} -> {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

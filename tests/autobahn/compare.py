#!/usr/bin/env python3
"""Compares an Autobahn (kosoku) report directory with tests/autobahn/expected.json.

Exits 1 when any case FAILED, or when a case's behaviour differs from the expected one
(better or worse: either way the committed file must be updated and the reason written
down), and prints a one-line summary in the "N passed, N failed" form.
"""
import glob
import json
import sys

report_dir, expected_file = sys.argv[1], sys.argv[2]
expected = json.load(open(expected_file))["cases"]
got = {}
for path in glob.glob(f"{report_dir}/*_case_*.json"):
    case = json.load(open(path))
    got[case["id"]] = case["behavior"]

problems = []
for case, want in expected.items():
    have = got.get(case)
    if have is None:
        problems.append(f"{case}: not run")
    elif have != want:
        problems.append(f"{case}: {have}, expected {want}")
for case, have in got.items():
    if case not in expected:
        problems.append(f"{case}: {have}, not in the expected results")
failed = [c for c, b in got.items() if b == "FAILED"]
counts = {}
for b in got.values():
    counts[b] = counts.get(b, 0) + 1
print("autobahn: " + ", ".join(f"{n} {b}" for b, n in sorted(counts.items())))
for p in problems:
    print("autobahn: " + p)
print(f"autobahn: {len(got) - len(problems) - len(failed)} passed, {len(problems) + len(failed)} failed")
sys.exit(1 if problems or failed else 0)

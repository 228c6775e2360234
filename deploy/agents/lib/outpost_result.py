"""Writes the Outpost result document for a CLI agent (Python twin of outpost-result.mjs):
   python3 outpost_result.py <agent> <exit-code> <output-file>"""
import json
import os
import sys

agent, exit_code, output_file = sys.argv[1:4]
result_path = os.environ.get("OUTPOST_RESULT_PATH", "/workspace/.outpost/result.json")
try:
    with open(output_file, encoding="utf-8", errors="replace") as f:
        output = f.read()
except OSError:
    output = ""
summary = output[-16 * 1024:].strip()
os.makedirs(os.path.dirname(result_path), exist_ok=True)
with open(result_path, "w", encoding="utf-8") as f:
    json.dump({"agent": agent, "model": os.environ.get("OUTPOST_MODEL", ""), "exit_code": int(exit_code), "summary": summary}, f)
    f.write("\n")

"""Time `imgrec data check` on all 70,000 Fashion-MNIST images and summarise its train/test findings (issue 13).

    python benchmarks/data_check_fmnist.py [--html report.html]

Prints the wall time, the exact and near duplicate counts (within train, within test, across), and how many
test images have a near twin in training at several correlation thresholds (the report's default is 0.995).
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--html")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    from imgrec.data.datacheck import check
    t0 = time.perf_counter()
    report = check("fashion-mnist", progress=True)
    seconds = time.perf_counter() - t0
    d = report.to_dict()
    near = d["near_duplicates"]
    out = {"seconds": round(seconds, 1), "images": d["images"], "exact_groups": len(d["exact_duplicates"]),
           "near_pairs": len(near), "near_pairs_across": sum(p["across_splits"] for p in near),
           "near_pairs_conflicting": sum(p["conflicting"] for p in near),
           "test_images_with_train_twin": d["leakage"]["eval_images_with_train_twin"], "by_threshold": {}}
    for t in (0.995, 0.996, 0.997, 0.998, 0.999, 0.9999):
        cross = [p for p in near if p["across_splits"] and p["similarity"] >= t]
        tests = {(p["a"] if p["a"]["split"] == "test" else p["b"])["index"] for p in cross}
        out["by_threshold"][str(t)] = {"pairs": sum(p["similarity"] >= t for p in near), "across": len(cross),
                                       "test_images": len(tests),
                                       "conflicting": sum(p["conflicting"] and p["similarity"] >= t for p in near)}
    print(json.dumps(out, indent=2))
    if args.html:
        report.write_html(args.html, limit=300)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(d, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

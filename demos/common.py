"""What every demo does: train with `npvae train`, evaluate with `npvae eval`, and copy the
figures the README shows into docs/images/. A demo is a list of command-line options: change
them and run the demo again."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout too

from npvae.cli import main  # noqa: E402


def run(name: str, train_args: list, k: int = 0, figures=("reconstructions", "samples")) -> dict:
    """Train into runs/demo-<name>, evaluate on the test set, copy figures; return eval.json."""
    run_dir = ROOT / "runs" / f"demo-{name}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    code = main(["train", *train_args, "--out", str(run_dir), "--no-progress"])
    if code != 0:
        raise SystemExit(code)
    code = main(["eval", str(run_dir), "--k", str(k)])
    if code != 0:
        raise SystemExit(code)
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        shutil.copyfile(run_dir / f"{fig}.png", images / f"{name}-{fig}.png")
    report = json.loads((run_dir / "eval.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report["train_seconds"] = round(sum(m.get("seconds", 0.0) for m in metrics), 1)
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

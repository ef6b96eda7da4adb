"""CLI latency: how long `gardenctl validate` (and friends) take, as a whole process.

    .venv/bin/python benchmarks/cli_latency.py [--runs N]

Writes a realistic 50-model garden.yaml (benchmarks/fleets.py, seeded: public catalog models
0.6B-72B, some quantized, max_model_len 2k-32k, replicas, TP up to 8; one key a line, as people
write it) with a declared inventory of 8 nodes x 8 GPUs (6 H100 nodes, 2 L40S nodes) into a
temporary folder, and times each command as a separate process (subprocess.run, wall clock from
spawn to exit, output captured), --runs times after 2 untimed warm-up runs:

- `python -c pass`                  the interpreter alone (the floor under everything else);
- `python -c "import gardenctl.cli"`
- `gardenctl --help`
- `gardenctl validate -f garden.yaml`   target: median under 300 ms;
- `gardenctl plan -f garden.yaml`       (state in an empty temporary folder: nothing running).

The processes get HF_HUB_CACHE pointing at an empty folder and HF_HUB_OFFLINE=1 (model metadata
then comes from gardenctl's built-in catalog, as in CI) and GARDENCTL_STATE_DIR in a temporary
folder. The commands are the virtualenv's own entry points (the `gardenctl` script next to this
Python). Also printed: the slowest imports of one `validate` run (python -X importtime), to show
where start-up time goes.

Exit status 1 if the median of `validate` is 300 ms or more (or a command fails).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fleets

TARGET_VALIDATE_S = 0.300
WARMUP = 2


def write_garden(folder: Path) -> tuple[Path, dict]:
    models = fleets.random_models(7, 50, 79.19, 8)
    fleet = fleets.scale_fleet(8)
    text = fleets.garden_yaml("cli-bench", models, fleet, style="block")
    path = folder / "garden.yaml"
    path.write_text(text)
    return path, {"models": len(models), "workers": sum(m.replicas for m in models),
                  "gpus": fleet.gpus, "fleet": fleet.describe(), "bytes": len(text),
                  "lines": text.count("\n")}


def time_command(argv: list[str], env: dict, runs: int, expect: int = 0) -> list[float]:
    times = []
    for i in range(WARMUP + runs):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != expect:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}"
                             f"{done.stderr}")
        if i >= WARMUP:
            times.append(elapsed)
    return times


def slowest_imports(argv: list[str], env: dict, count: int = 8) -> list[tuple[str, int]]:
    """(module, cumulative microseconds) of the slowest top-level imports of one run, after
    their sum: lines of `import time: SELF | CUMULATIVE | NAME`, NAME indented by depth."""
    done = subprocess.run(argv, env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                          capture_output=True, text=True, check=False)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:"):].split("|", 2)
        if len(fields) != 3 or not fields[1].strip().isdigit():
            continue  # the header line
        name = fields[2]
        if name.startswith(" ") and not name.startswith("  "):  # top level
            rows.append((name.strip(), int(fields[1])))
    total = sum(us for _, us in rows)
    rows.sort(key=lambda r: -r[1])
    return [("(all top-level imports)", total)] + rows[:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    gardenctl = bin_dir / "gardenctl"
    if not gardenctl.exists():
        print(f"no gardenctl entry point next to {sys.executable}: pip install -e . first",
              file=sys.stderr)
        return 2
    machine = fleets.machine()
    print(machine.markdown())
    with tempfile.TemporaryDirectory(prefix="gardenctl-cli-bench-") as tmp:
        folder = Path(tmp)
        (folder / "hf-empty").mkdir()
        (folder / "state").mkdir()
        env = {**os.environ, "HF_HUB_CACHE": str(folder / "hf-empty"), "HF_HUB_OFFLINE": "1",
               "GARDENCTL_STATE_DIR": str(folder / "state")}
        env.pop("PYTHONPROFILEIMPORTTIME", None)
        fleets.use_catalog_only()
        garden, info = write_garden(folder)
        print(f"garden: {info['models']} models, {info['workers']} workers, {info['lines']} "
              f"lines ({info['bytes']:,} bytes); inventory {info['fleet']} = {info['gpus']} GPUs")
        commands = [
            ("python -c pass", [sys.executable, "-c", "pass"], None, 0),
            ('python -c "import gardenctl.cli"', [sys.executable, "-c", "import gardenctl.cli"],
             None, 0),
            ("gardenctl --help", [str(gardenctl), "--help"], None, 0),
            ("gardenctl validate -f garden.yaml", [str(gardenctl), "validate", "-f", str(garden)],
             TARGET_VALIDATE_S, 0),
            ("gardenctl plan -f garden.yaml", [str(gardenctl), "plan", "-f", str(garden)],
             None, 0),
        ]
        results = []
        for label, argv, target, expect in commands:
            results.append((label, time_command(argv, env, args.runs, expect), target))
        imports = slowest_imports([str(gardenctl), "validate", "-f", str(garden)], env)

    ok = True
    header = f"{'command':<36} {'median':>9} {'min':>9} {'max':>9} {'target':>8}  met"
    print(header)
    print("-" * len(header))
    for label, times, target in results:
        median = statistics.median(times)
        met = ""
        if target is not None:
            met = "yes" if median < target else "NO"
            ok = ok and median < target
        target_text = "" if target is None else f"{target * 1000:.0f} ms"
        print(f"{label:<36} {median * 1000:>6.0f} ms {min(times) * 1000:>6.0f} ms "
              f"{max(times) * 1000:>6.0f} ms {target_text:>8}  {met}")
    print(f"({args.runs} runs each after {WARMUP} warm-up runs; whole process, spawn to exit)")
    print("\nslowest imports of one `gardenctl validate` run (python -X importtime, cumulative):")
    for name, us in imports:
        print(f"  {us / 1000:>7.1f} ms  {name}")
    print("all targets met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

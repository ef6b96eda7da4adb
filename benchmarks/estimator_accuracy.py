"""Estimator accuracy: gardenctl's memory estimate against real vLLM start-ups.

    python benchmarks/estimator_accuracy.py

Reads tests/data/vllm-startup-memory-calibration.csv (what vLLM itself logged at start-up) and,
for every row whose start-up succeeded, estimates the same request from config.json values (the
built-in catalog, as on a machine without the model) and prints, per row, measured vs estimated
per GPU: weights, activation peak, non-torch memory, CUDA graphs, KV bytes per token, and the
total footprint error with its sign (negative = under-estimate = an OOM risk).

"Total" is the memory one worker needs on each of its GPUs to start with one full sequence:

    weights + activation peak + non-torch + CUDA graphs + KV cache of one max_model_len sequence
    + CUDA context (outside --gpu-memory-utilization)

- measured KV of one sequence = the estimated one scaled by measured / estimated KV bytes per
  token (kv_cache_gib / kv_tokens from the log; for hybrid models kv_tokens is vLLM's
  group-aware capacity, so padding layers are included);
- measured CUDA context = gpu_total_gib - init_free_gib (the memory gone before vLLM allocates);
- measured CUDA graphs = cuda_graph_actual_gib, with a negative value (memory freed during
  capture, vLLM 0.11 rows) counted as 0, and 0 under enforce_eager;
- an item the log does not give (n/a in the table) takes the estimated value on both sides, so
  a row checks only what it has.

The seeds' baselines are scored the same way (their total_bytes against the measured total):
model-garden on every row, ndif only at TP 1 (it has no tensor parallelism).

Targets (asserted by tests/test_estimate_accuracy.py) cover the V1-engine rows, the engine
gardenctl plans for (vLLM >= 0.11 has no other): median |total error| < 8% and no row
under-estimated by more than 5%. V0 rows are shown for information. The config-arithmetic
weights must also be within WEIGHTS_TOLERANCE of every measured `Model loading took` of a V1 row.
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gardenctl.estimate import EstimateRequest, MemoryEstimate, estimate_memory  # noqa: E402
from gardenctl.estimate.catalog import catalog_metadata, load_catalog  # noqa: E402
from gardenctl.units import GiB  # noqa: E402

CALIBRATION_CSV = REPO / "tests" / "data" / "vllm-startup-memory-calibration.csv"
TARGET_MEDIAN_ABS_ERROR = 0.08
TARGET_WORST_UNDER = -0.05
WEIGHTS_TOLERANCE = 0.05
# Rows whose model_id column is prose rather than an id.
MODEL_IDS = {"84": "Qwen/Qwen2.5-7B-Instruct-AWQ"}
BASELINES = ("model-garden", "ndif")
ITEMS = ("weights", "activation", "non_torch", "cuda_graph", "kv_sequence", "cuda_context")
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")
_VERSION = re.compile(r"\d+\.\d+(?:\.\d+)?")


@dataclass(frozen=True)
class RowComparison:
    row_id: str
    model: str
    tp: int
    engine: str
    version: str
    measured: dict[str, int | None]  # None: not in the log
    estimated: dict[str, int]
    kv_per_token_measured: int | None
    kv_per_token_estimated: int
    estimate: MemoryEstimate = field(repr=False)
    baseline_totals: dict[str, int | None] = field(default_factory=dict)  # None: not comparable

    @property
    def in_targets(self) -> bool:
        return self.engine == "V1"

    @property
    def total_estimated(self) -> int:
        return sum(self.estimated.values())

    @property
    def total_measured(self) -> int:
        return sum(
            self.estimated[item] if value is None else value
            for item, value in self.measured.items()
        )

    @property
    def error(self) -> float:
        return self.total_estimated / self.total_measured - 1.0

    def baseline_error(self, estimator: str) -> float | None:
        total = self.baseline_totals.get(estimator)
        return None if total is None else total / self.total_measured - 1.0

    @property
    def overheads_error(self) -> float | None:
        """Error of activation + non-torch + CUDA graphs, where the log has all three."""
        keys = ("activation", "non_torch", "cuda_graph")
        if any(self.measured[k] is None for k in keys):
            return None
        measured = sum(self.measured[k] for k in keys)
        return sum(self.estimated[k] for k in keys) / measured - 1.0

    @property
    def weights_error(self) -> float | None:
        measured = self.measured["weights"]
        return None if measured is None else self.estimated["weights"] / measured - 1.0


def number(text: str | None) -> float | None:
    """The leading number of a cell such as '67.72 (67.7229 GB)' or '6.74 (derived: ...)'."""
    match = _NUMBER.match(text or "")
    return float(match.group(1)) if match else None


def load_rows(path: Path = CALIBRATION_CSV) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def row_version(row: dict[str, str]) -> str | None:
    """The vLLM release of a row ('0.11.0 (per doc; V1)' -> '0.11.0', '~0.7.x' -> '0.7')."""
    match = _VERSION.search(row["vllm_version"] or "")
    return match.group(0) if match else None


def request_for(row: dict[str, str], with_version: bool = True) -> EstimateRequest:
    max_len = number(row["max_model_len"])
    batched = number(row["max_num_batched_tokens"])
    quantization = (row["quantization"] or "none").split()[-1]
    return EstimateRequest(
        model=MODEL_IDS.get(row["row_id"], row["model_id"]),
        max_model_len=int(max_len) if max_len else None,
        tensor_parallel_size=int(row["tensor_parallel_size"]),
        dtype=row["dtype"] or "auto",
        quantization=None if quantization == "none" else quantization,
        kv_cache_dtype=row["kv_cache_dtype"] or "auto",
        enforce_eager=row["enforce_eager"] == "True",
        max_num_batched_tokens=int(batched) if batched else None,
        vllm_version=row_version(row) if with_version else None,
    )


def compare_row(row: dict[str, str], catalog: dict, with_version: bool = True) -> RowComparison:
    """Measured vs estimated for one row; ``with_version=False`` ignores the row's vLLM
    release (the estimate then assumes the newest modelled one, as before issue 8)."""
    request = request_for(row, with_version)
    metadata = catalog_metadata(request.model, catalog)
    if metadata is None:
        raise LookupError(f"row {row['row_id']}: {request.model} is not in the built-in catalog")
    estimate = estimate_memory(request, metadata)
    baselines = {
        "model-garden": estimate_memory(request, metadata, "model-garden").total_bytes,
        "ndif": (
            estimate_memory(request, metadata, "ndif").total_bytes
            if request.tensor_parallel_size == 1
            else None
        ),
    }
    estimated = {
        "weights": estimate.weights.bytes,
        "activation": estimate.activation.bytes,
        "non_torch": estimate.non_torch.bytes,
        "cuda_graph": estimate.cuda_graph.bytes,
        "kv_sequence": estimate.kv_cache.bytes,
        "cuda_context": estimate.cuda_context.bytes,
    }
    kv_gib, kv_tokens = number(row["kv_cache_gib"]), number(row["kv_tokens"])
    kv_per_token = round(kv_gib * GiB / kv_tokens) if kv_gib and kv_tokens else None
    graphs = number(row["cuda_graph_actual_gib"])
    if request.enforce_eager:
        graphs = 0.0
    total, free = number(row["gpu_total_gib"]), number(row["init_free_gib"])
    measured: dict[str, int | None] = {
        "weights": _gib(number(row["weights_gib"])),
        "activation": _gib(number(row["activation_peak_gib"])),
        "non_torch": _gib(number(row["non_torch_gib"])),
        "cuda_graph": None if graphs is None else _gib(max(0.0, graphs)),
        "kv_sequence": (
            None
            if kv_per_token is None
            else round(estimate.kv_cache.bytes * kv_per_token / estimate.kv_bytes_per_token)
        ),
        "cuda_context": _gib(total - free) if total and free else None,
    }
    return RowComparison(
        row_id=row["row_id"],
        model=request.model,
        tp=request.tensor_parallel_size,
        engine=row["engine"],
        version=row["vllm_version"].split()[0],
        measured=measured,
        estimated=estimated,
        kv_per_token_measured=kv_per_token,
        kv_per_token_estimated=estimate.kv_bytes_per_token,
        estimate=estimate,
        baseline_totals=baselines,
    )


def compare_all(path: Path = CALIBRATION_CSV, with_version: bool = True) -> list[RowComparison]:
    """One comparison per successful start-up whose max_model_len is known."""
    catalog = load_catalog()
    rows = [r for r in load_rows(path) if r["status"] == "ok" and number(r["max_model_len"])]
    return [compare_row(row, catalog, with_version) for row in rows]


def by_release(
    comparisons: list[RowComparison], ignoring: list[RowComparison] | None = None
) -> list[dict[str, object]]:
    """Error per vLLM release of the rows (in release order): rows, median |error|, worst
    under- and over-estimate, and, given ``ignoring`` (the same rows estimated without their
    release), the median |error| when the release is not taken into account."""
    ignored = {c.row_id: c for c in ignoring or []}
    groups: dict[str, list[RowComparison]] = {}
    for c in comparisons:
        groups.setdefault(f"{c.version} {c.engine}", []).append(c)
    result: list[dict[str, object]] = []
    for key in sorted(groups, key=_release_order):
        rows = groups[key]
        errors = [c.error for c in rows]
        entry: dict[str, object] = {
            "release": key,
            "vllm_range": rows[0].estimate.vllm_range,
            "rows": len(rows),
            "median_abs_error": statistics.median(abs(e) for e in errors),
            "worst_under": min(errors),
            "worst_over": max(errors),
        }
        if ignored:
            before = [ignored[c.row_id].error for c in rows if c.row_id in ignored]
            entry["ignoring_release_median_abs_error"] = statistics.median(abs(e) for e in before)
            entry["ignoring_release_worst_under"] = min(before)
        result.append(entry)
    return result


def _release_order(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _VERSION.findall(key)[0].split("."))


def render_releases(table: list[dict[str, object]]) -> str:
    head = (
        f"{'vLLM (engine)':<16} {'modelled as':<32} {'rows':>4} {'median |err|':>12}"
        f" {'worst under':>11} {'worst over':>10} {'release ignored: median':>24} {'worst':>7}"
    )
    lines = [head, "-" * len(head)]
    for e in table:
        ignored = e.get("ignoring_release_median_abs_error")
        lines.append(
            f"{e['release']:<16} {e['vllm_range']!s:<32} {e['rows']:>4}"
            f" {e['median_abs_error']:>12.1%} {e['worst_under']:>+11.1%} {e['worst_over']:>+10.1%}"
            + (
                f" {ignored:>24.1%} {e['ignoring_release_worst_under']:>+7.1%}"
                if isinstance(ignored, float)
                else ""
            )
        )
    lines.append("(release ignored = estimated as the newest modelled release, as before issue 8)")
    return "\n".join(lines)


def summarize(comparisons: list[RowComparison]) -> dict[str, float]:
    targeted = [c for c in comparisons if c.in_targets]
    errors = [c.error for c in targeted]
    weights = [abs(e) for c in targeted if (e := c.weights_error) is not None]
    overheads = [e for c in targeted if (e := c.overheads_error) is not None]
    baselines = {}
    for name in BASELINES:
        errs = [e for c in targeted if (e := c.baseline_error(name)) is not None]
        baselines[f"{name}_median_abs_error"] = statistics.median(abs(e) for e in errs)
        baselines[f"{name}_worst_under"] = min(errs)
        baselines[f"{name}_rows"] = len(errs)
    return {
        **baselines,
        "rows": len(targeted),
        "median_abs_error": statistics.median(abs(e) for e in errors),
        "mean_abs_error": statistics.fmean(abs(e) for e in errors),
        "worst_under": min(errors),
        "worst_over": max(errors),
        "worst_weights_error": max(weights),
        "overheads_median_abs_error": statistics.median(abs(e) for e in overheads),
        "all_rows_median_abs_error": statistics.median(abs(c.error) for c in comparisons),
    }


def render_table(comparisons: list[RowComparison]) -> str:
    head = (
        f"{'row':>4} {'model':<44} {'tp':>2} {'vLLM':<9}"
        f" {'weights GiB':>13} {'activ. GiB':>11} {'non-torch':>10} {'graphs':>10}"
        f" {'KV B/token':>17} {'total GiB':>13} {'error':>7} {'m-garden':>8} {'ndif':>7}"
    )
    lines = [head, "-" * len(head)]
    for c in comparisons:
        kv_meas = f"{c.kv_per_token_measured:,}" if c.kv_per_token_measured else "n/a"
        flag = "" if c.in_targets else "  (V0: not targeted)"
        lines.append(
            f"{c.row_id:>4} {c.model[:44]:<44} {c.tp:>2} {c.version[:9]:<9}"
            f" {_pair(c, 'weights', 13)} {_pair(c, 'activation', 11)} {_pair(c, 'non_torch', 10)}"
            f" {_pair(c, 'cuda_graph', 10)}"
            f" {kv_meas + '/' + format(c.kv_per_token_estimated, ','):>17}"
            f" {c.total_measured / GiB:6.1f}/{c.total_estimated / GiB:<6.1f} {c.error:+7.1%}"
            f" {_percent(c.baseline_error('model-garden')):>8}"
            f" {_percent(c.baseline_error('ndif')):>7}"
            f"{flag}"
        )
    lines.append("(measured/estimated per GPU; n/a = not in the log, the estimate stands in)")
    return "\n".join(lines)


def _pair(c: RowComparison, item: str, width: int) -> str:
    measured = c.measured[item]
    left = "n/a" if measured is None else f"{measured / GiB:.2f}"
    return f"{left}/{c.estimated[item] / GiB:.2f}".rjust(width)


def _percent(error: float | None) -> str:
    return "n/a" if error is None else f"{error:+.0%}"


def _gib(value: float | None) -> int | None:
    return None if value is None else round(value * GiB)


def main() -> int:
    comparisons = compare_all()
    print(render_table(comparisons))
    print()
    print(render_releases(by_release(comparisons, compare_all(with_version=False))))
    s = summarize(comparisons)
    print()
    print(
        f"V1 rows: {s['rows']}; median |total error| {s['median_abs_error']:.1%} "
        f"(target < {TARGET_MEDIAN_ABS_ERROR:.0%}), mean {s['mean_abs_error']:.1%}"
    )
    print(
        f"worst under-estimate {s['worst_under']:+.1%} (target > {TARGET_WORST_UNDER:+.0%}), "
        f"worst over-estimate {s['worst_over']:+.1%}"
    )
    print(
        "activation + non-torch + CUDA graphs alone: median |error| "
        f"{s['overheads_median_abs_error']:.1%}"
    )
    for name in BASELINES:
        print(
            f"baseline {name} ({s[name + '_rows']} rows): median |total error| "
            f"{s[name + '_median_abs_error']:.0%}, worst under-estimate "
            f"{s[name + '_worst_under']:+.0%}"
        )
    print(
        f"worst config-arithmetic weights error {s['worst_weights_error']:.1%} "
        f"(tolerance {WEIGHTS_TOLERANCE:.0%}); all rows incl. V0: median |error| "
        f"{s['all_rows_median_abs_error']:.1%}"
    )
    ok = s["median_abs_error"] < TARGET_MEDIAN_ABS_ERROR and s["worst_under"] > TARGET_WORST_UNDER
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

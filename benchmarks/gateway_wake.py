"""Gateway wake-up: time from a request for a sleeping (standby) model to its first token,
through `gardenctl gateway`, with the stand-in vLLM's simulated sleep and wake delays.

    python benchmarks/gateway_wake.py [--rounds 20] [--idle-timeout 2] [--no-idle]
        [--wake-delay 0.3] [--wake-delay-level2 0.9] [--sleep-delay 0.1]
    python benchmarks/gateway_wake.py --quick      # 2 rounds, to see that it works

A garden in a temporary folder (tests/e2e_helpers.py) with one declared 10 GiB GPU and two
standby models of stand-in workers: `a` (`standby: sleep`, level 1: weights kept in host RAM)
and `b` (`standby: {mode: sleep, level: 2}`: weights dropped, so a wake-up also reloads them
with reload_weights). `gardenctl plan -o json` is read first to check the setting: one GPU
row where both are booked asleep plus one wake slot (they fit asleep) and the slot holds one
of them awake, not both. The real `gardenctl apply` starts them (apply puts standby workers to
sleep once ready), then `gardenctl gateway` runs in front.

Each request is a streamed /v1/chat/completions (max_tokens 4) on a fresh connection, timed
from sending it to the first chunk that carries a token, then read to `data: [DONE]` (so the
model is idle afterwards); its text is checked (a level-2 wake-up without reload_weights
answers garbage in the stand-in). Each of --rounds rounds is, with the workers' GET
/is_sleeping checked before each request:

1. both asleep: request `a`                -> "level-1 wake"
2. request `a` again (awake)               -> "awake (baseline)"
3. request `b`: `a` is idle and must sleep first (only one fits awake)
                                           -> "level-2 wake that first evicts"
4. request `a`: `b` sleeps first           -> "level-1 wake that first evicts"
5. wait until the gateway puts the idle `a` to sleep (idle_timeout: --idle-timeout seconds)
6. both asleep: request `b`                -> "level-2 wake"
7. request `b` again (awake)               -> "awake (baseline)"
then wait until `b` sleeps again. --no-idle skips 5-7 and the wait (for a gateway that does
not yet put idle models to sleep): only the first round's step 1 is then a wake with nothing
to evict.

The stand-in's delays are printed: a level-1 /wake_up takes STANDIN_VLLM_WAKE_DELAY, a
level-2 one STANDIN_VLLM_WAKE_DELAY_LEVEL2 (reload_weights and reset_prefix_cache add
nothing), a /sleep STANDIN_VLLM_SLEEP_DELAY. The table gives, per case, p50 / p99, that
simulated delay, and p50 - simulated - awake p50: what the gateway's wake-up itself costs
(deciding, calling the routes, waiting for the worker, then forwarding), and the gateway's
own wake-wait figure from /metrics (gardenctl_gateway_wake_seconds, mean per wake-up).

If a request for a sleeping model gets no first token within --wake-timeout + 15 s, or an
error status, the gateway's wake-on-demand is missing or broken: the script says so, shows
the end of the gateway's log and exits 1. No timing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from e2e_helpers import GPU_MEMORY, Garden, garden_at, http_get, model  # noqa: E402
from gateway_helpers import Gateway, write_garden  # noqa: E402

PROMPT = "alpha beta gamma delta"
MAX_TOKENS = 4
EXPECTED_TEXT = PROMPT  # the stand-in echoes the prompt's words, max_tokens of them
GIB = 1024**3

L1_WAKE = "level-1 wake"
L2_WAKE = "level-2 wake"
L1_EVICT = "level-1 wake that first evicts (level-2 model to sleep)"
L2_EVICT = "level-2 wake that first evicts (level-1 model to sleep)"
AWAKE = "awake (baseline)"
CASES = (L1_WAKE, L2_WAKE, L1_EVICT, L2_EVICT, AWAKE)


class WakeFailed(RuntimeError):
    """A request for a sleeping model did not get its answer: the message says why."""


@dataclass
class Delays:
    wake: float
    wake_level2: float
    sleep: float

    def simulated(self, case: str) -> float:
        """Seconds the stand-in sleeps on purpose on this case's path."""
        return {L1_WAKE: self.wake, L2_WAKE: self.wake_level2,
                L1_EVICT: self.sleep + self.wake, L2_EVICT: self.sleep + self.wake_level2,
                AWAKE: 0.0}[case]


@dataclass
class Case:
    samples: list[float] = field(default_factory=list)  # seconds to the first token
    wake_waits: list[float] = field(default_factory=list)  # the gateway's, from /metrics


# -- one request ---------------------------------------------------------------------------------

def first_token(port: int, name: str, timeout: float) -> tuple[float, str]:
    """(seconds from sending to the first token chunk, the whole text) of one streamed chat
    completion for ``name``. Raises WakeFailed on an error status, a stall or a cut answer."""
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": MAX_TOKENS, "stream": True}).encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    first: float | None = None
    text: list[str] = []
    try:
        connection.request("POST", "/v1/chat/completions", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise WakeFailed(f"the gateway answered {response.status} for {name!r}: "
                             f"{response.read(500).decode('utf-8', 'replace')}")
        done = False
        while not done:
            line = response.readline()
            if not line:
                raise WakeFailed(f"the answer for {name!r} ended without data: [DONE]")
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            for choice in json.loads(payload).get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.perf_counter() - started
                    text.append(content)
    except TimeoutError:
        raise WakeFailed(
            f"no {'first token' if first is None else '[DONE]'} for {name!r} within "
            f"{timeout:.0f} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise WakeFailed(f"the request for {name!r} failed: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    if first is None:
        raise WakeFailed(f"the answer for {name!r} carried no token")
    return first, "".join(text)


# -- the garden ----------------------------------------------------------------------------------

def standby_models(idle_timeout: float) -> list[dict]:
    return [model("a", standby={"mode": "sleep", "level": 1, "idle_timeout": idle_timeout}),
            model("b", standby={"mode": "sleep", "level": 2, "idle_timeout": idle_timeout})]


def check_plan(garden: Garden) -> str:
    """Check with `gardenctl plan -o json` that both models share the one GPU, fit there
    asleep, and that the wake slot holds one of them awake but not both; a line that says so.
    Raises SystemExit when the garden does not give that setting."""
    run = garden.run("plan", "-o", "json")
    if run.code != 0:
        raise SystemExit(f"gardenctl plan failed:\n{run}")
    gpus = run.json().get("gpus") or []
    rows = [g for g in gpus if g.get("standby_after")]
    if len(rows) != 1 or len(rows[0]["standby_after"]) != 2:
        raise SystemExit("expected one GPU holding both standby models; plan -o json gpus: "
                         + json.dumps(gpus)[:2000])
    row = rows[0]
    growth = [s["awake_bytes"] - s["asleep_bytes"] for s in row["standby_after"]]
    usable = row["total_bytes"] - row["reserve_bytes"] - row["used_by_others_bytes"]
    awake_both = sum(s["awake_bytes"] for s in row["standby_after"])
    slot = row["wake_slot_bytes"]
    if not (max(growth) <= slot < sum(growth) and row["claimed_after_bytes"] <= usable
            < awake_both):
        raise SystemExit(f"the GPU does not give 'both fit asleep, one awake at a time': "
                         f"{json.dumps(row)}")
    asleep = " + ".join(f"{s['asleep_bytes'] / GIB:.2f}" for s in row["standby_after"])
    return (f"GPU {row['node']}/{row['index']}: {row['total_bytes'] / GIB:.1f} GiB, "
            f"{usable / GIB:.2f} GiB usable (after the reserve); booked asleep {asleep} GiB "
            f"+ wake slot {slot / GIB:.2f} GiB = {row['claimed_after_bytes'] / GIB:.2f} GiB; "
            f"awake {awake_both / 2 / GIB:.2f} GiB each, both awake would need "
            f"{awake_both / GIB:.2f} GiB")


# -- the run -------------------------------------------------------------------------------------

class Bench:
    def __init__(self, garden: Garden, gateway: Gateway, ports: dict[str, int],
                 timeout: float, idle_wait: float) -> None:
        self.garden = garden
        self.gateway = gateway
        self.ports = ports  # model name -> its worker's port
        self.timeout = timeout
        self.idle_wait = idle_wait
        self.cases = {case: Case() for case in CASES}
        self.notes: list[str] = []

    def sleeping(self) -> dict[str, bool | None]:
        """Each model's worker's own answer to GET /is_sleeping (None: no answer)."""
        states = {}
        for name, port in self.ports.items():
            status, body = http_get(port, "/is_sleeping")
            states[name] = body.get("is_sleeping") if status == 200 and isinstance(
                body, dict) else None
        return states

    def wake_metrics(self, name: str) -> tuple[float, float, float]:
        """The gateway's (wake-ups, wake_seconds sum, wake_seconds count) for ``name``."""
        return (self.gateway.metric("gardenctl_gateway_wakeups_total", model=name),
                self.gateway.metric("gardenctl_gateway_wake_seconds_sum", model=name),
                self.gateway.metric("gardenctl_gateway_wake_seconds_count", model=name))

    def expect(self, where: str, **asleep: bool) -> None:
        """Note (not fail) a state that is not the one this step is meant to start from."""
        found = self.sleeping()
        wrong = {n: found.get(n) for n, want in asleep.items() if found.get(n) is not want}
        if wrong:
            shown = ", ".join(f"{n} {'asleep' if s else 'awake' if s is False else 'unknown'}"
                              for n, s in sorted(wrong.items()))
            self.notes.append(f"{where}: expected {_states(asleep)}; found {shown}")

    def request(self, where: str, name: str, case: str) -> None:
        before = self.wake_metrics(name)
        try:
            seconds, text = first_token(self.gateway.port, name, self.timeout)
        except WakeFailed as exc:
            asleep = case != AWAKE
            raise WakeFailed(f"{where}: {exc}" + (
                ". A request for a sleeping model got no answer: the gateway's wake-on-demand "
                "is missing or broken (the stand-in, like vLLM, queues requests while it "
                "sleeps, so a gateway that does not wake it leaves the request hanging)"
                if asleep else "")) from None
        after = self.wake_metrics(name)
        self.cases[case].samples.append(seconds)
        woke = after[0] - before[0]
        if case == AWAKE and woke:
            self.notes.append(f"{where}: the gateway counted a wake-up for an awake model")
        if case != AWAKE:
            if not woke:
                self.notes.append(f"{where}: gardenctl_gateway_wakeups_total did not grow")
            if after[2] > before[2]:
                self.cases[case].wake_waits.append((after[1] - before[1]) /
                                                   (after[2] - before[2]))
        if text.split() != EXPECTED_TEXT.split()[:MAX_TOKENS]:
            self.notes.append(f"{where}: answered {text!r} (expected {EXPECTED_TEXT!r}: a "
                              "level-2 wake-up without reload_weights answers garbage)")

    def wait_asleep(self, where: str, *names: str) -> bool:
        """Wait until the gateway has put ``names`` to sleep (idle) and finished doing so (the
        worker says it sleeps as soon as its scheduler pauses, before its memory is freed; the
        gateway's standby.json says "asleep" once the sleep returned); False after idle_wait."""
        deadline = time.monotonic() + self.idle_wait
        while time.monotonic() < deadline:
            if all(self.sleeping().get(n) for n in names) and self.gateway_says_asleep(names):
                return True
            time.sleep(0.05)
        self.notes.append(f"{where}: {', '.join(names)} still awake {self.idle_wait:.0f} s "
                          "after its last request: the gateway does not put idle standby "
                          "models to sleep (idle_timeout); the remaining rounds skip the "
                          "wake-ups with nothing to evict")
        return False

    def gateway_says_asleep(self, names: tuple[str, ...]) -> bool:
        path = self.garden.state / "gardens" / self.garden.name / "standby.json"
        try:
            workers = json.loads(path.read_text())["workers"]
        except (OSError, ValueError, KeyError):
            return False
        states = {worker_id.split("/")[1]: view.get("state") for worker_id, view in
                  workers.items()}
        return all(states.get(name) == "asleep" for name in names)

    def run(self, rounds: int, idle: bool, progress: Callable[[str], None]) -> None:
        for number in range(1, rounds + 1):
            here = f"round {number}"
            if number == 1 or idle:
                self.expect(f"{here}, step 1", a=True, b=True)
                self.request(f"{here}, step 1", "a", L1_WAKE)
            else:  # a gateway that keeps idle models awake: b is awake here, a asleep
                self.expect(f"{here}, step 1", a=True, b=False)
                self.request(f"{here}, step 1", "a", L1_EVICT)
            self.expect(f"{here}, step 2", a=False)
            self.request(f"{here}, step 2", "a", AWAKE)
            self.expect(f"{here}, step 3", a=False, b=True)
            self.request(f"{here}, step 3", "b", L2_EVICT)
            self.expect(f"{here}, after step 3", a=True, b=False)
            self.request(f"{here}, step 4", "a", L1_EVICT)
            self.expect(f"{here}, after step 4", a=False, b=True)
            if idle:
                idle = self.wait_asleep(f"{here}, step 5", "a")
            if idle:
                self.expect(f"{here}, step 6", a=True, b=True)
                self.request(f"{here}, step 6", "b", L2_WAKE)
                self.expect(f"{here}, step 7", b=False)
                self.request(f"{here}, step 7", "b", AWAKE)
                idle = self.wait_asleep(f"{here}, end", "b")
            else:  # steps 3-4 again, so that round 2 starts with b awake
                self.request(f"{here}, step 4b", "b", L2_EVICT)
            progress(f"... round {number} of {rounds} done")


# -- the report ----------------------------------------------------------------------------------

def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(bench: Bench, delays: Delays, args: argparse.Namespace, plan_line: str) -> None:
    print(f"Machine: `{' '.join(platform.uname())}`; {os.cpu_count()} cores; Python "
          f"{platform.python_version()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"Garden: {plan_line}.")
    print(f"Stand-in delays: STANDIN_VLLM_WAKE_DELAY={delays.wake} s (level-1 /wake_up), "
          f"STANDIN_VLLM_WAKE_DELAY_LEVEL2={delays.wake_level2} s (level-2 /wake_up; "
          f"reload_weights and reset_prefix_cache add nothing), "
          f"STANDIN_VLLM_SLEEP_DELAY={delays.sleep} s (/sleep); idle_timeout "
          f"{args.idle_timeout} s{'' if args.idle else ' (not waited for: --no-idle)'}; "
          f"{args.rounds} rounds; streamed chat completions of {MAX_TOKENS} tokens.\n")
    awake = bench.cases[AWAKE].samples
    base = percentile(awake, 50) if awake else 0.0
    print("| case | n | first token p50 / p99 (ms) | stand-in's simulated delay (ms) "
          "| gateway's cost: p50 - simulated - awake p50 (ms) "
          "| gateway's wake wait, /metrics mean (ms) |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        data = bench.cases[case]
        if not data.samples:
            print(f"| {case} | 0 | - | - | - | - |")
            continue
        p50, p99 = percentile(data.samples, 50), percentile(data.samples, 99)
        simulated = delays.simulated(case)
        cost = "-" if case == AWAKE else f"{1000 * (p50 - simulated - base):+.1f}"
        waits = (f"{1000 * sum(data.wake_waits) / len(data.wake_waits):.1f}"
                 if data.wake_waits else "-")
        print(f"| {case} | {len(data.samples)} | {1000 * p50:.1f} / {1000 * p99:.1f} "
              f"| {1000 * simulated:.0f} | {cost} | {waits} |")
    if bench.notes:
        shown = bench.notes[:30]
        more = len(bench.notes) - len(shown)
        print("\nNotes:\n" + "\n".join(f"- {note}" for note in shown)
              + (f"\n- ... and {more} more" if more else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20,
                        help="rounds of the cycle (default 20: 20 samples of each wake-up)")
    parser.add_argument("--idle-timeout", type=float, default=2.0,
                        help="the models' standby idle_timeout in seconds (default 2)")
    parser.add_argument("--no-idle", dest="idle", action="store_false",
                        help="do not wait for idle models to fall asleep (only wake-ups that "
                             "evict, after the first)")
    parser.add_argument("--wake-timeout", type=float, default=30.0,
                        help="the gateway's wake_timeout in seconds (default 30)")
    parser.add_argument("--wake-delay", type=float, default=0.3,
                        help="STANDIN_VLLM_WAKE_DELAY (default 0.3, the stand-in's)")
    parser.add_argument("--wake-delay-level2", type=float, default=0.9,
                        help="STANDIN_VLLM_WAKE_DELAY_LEVEL2 (default 0.9, the stand-in's)")
    parser.add_argument("--sleep-delay", type=float, default=0.1,
                        help="STANDIN_VLLM_SLEEP_DELAY (default 0.1, the stand-in's)")
    parser.add_argument("--quick", action="store_true", help="a tiny run: 2 rounds, idle 1 s")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.idle_timeout = 2, 1.0
    delays = Delays(args.wake_delay, args.wake_delay_level2, args.sleep_delay)
    env = {"STANDIN_VLLM_WAKE_DELAY": str(delays.wake),
           "STANDIN_VLLM_WAKE_DELAY_LEVEL2": str(delays.wake_level2),
           "STANDIN_VLLM_SLEEP_DELAY": str(delays.sleep)}
    with tempfile.TemporaryDirectory() as folder, \
            garden_at(Path(folder) / "g", gpus=1) as garden:
        write_garden(garden, standby_models(args.idle_timeout), {"wake_timeout": args.wake_timeout},
                     defaults={"env": env},
                     comment=f"gateway_wake.py: two standby models on one {GPU_MEMORY} GPU")
        plan_line = check_plan(garden)
        run = garden.apply()
        if run.code != 0:
            raise SystemExit(f"gardenctl apply failed:\n{run}")
        workers = garden.workers()
        ports = {n: workers[garden.worker_id(n)]["port"] for n in ("a", "b")}
        gateway = Gateway(garden)
        bench = Bench(garden, gateway, ports, args.wake_timeout + 15,
                      args.idle_timeout + 30)
        if not bench.wait_asleep("after apply", "a", "b"):
            raise SystemExit("apply left a standby model awake: " + json.dumps(bench.sleeping()))
        try:
            bench.run(args.rounds, args.idle, lambda line: print(line, file=sys.stderr,
                                                                 flush=True))
        except WakeFailed as exc:
            if any(case.samples for case in bench.cases.values()):
                report(bench, delays, args, plan_line)
            tail = "\n".join(gateway.log().splitlines()[-15:])
            print(f"\nFAILED: {exc}\n\nThe gateway's log ends with:\n{tail}", flush=True)
            return 1
    report(bench, delays, args, plan_line)
    return 0


def _states(asleep: dict[str, bool]) -> str:
    return ", ".join(f"{n} {'asleep' if s else 'awake'}" for n, s in sorted(asleep.items()))


if __name__ == "__main__":
    sys.exit(main())

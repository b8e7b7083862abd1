"""How long ``csand adopt`` takes for a large organisation switching from the hosted integration.

Run ``python bench/adopt.py [--petitions 5000]``. The real ``csand adopt`` process against both
simulators on loopback: every launched CS petition was mirrored by ControlShift's hosted
integration (a few of them twice: ambiguous). Measured twice: with AN's rate limit lifted (the
engine's own cost: listing, matching, recording), and at AN's real 4 requests/second with the
simulator enforcing it. ControlShift's simulator enforces its 1000 requests/minute throughout.
Prints one JSON line with the figures last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from csand.sim.actionnetwork import ActionNetworkSim
from csand.sim.controlshift import ControlShiftSim
from csand.sim.scenario import populate
from csand.sim.server import ServedApp

CS_KEY = "cs-bench-key"
AN_KEY = "an-bench-key"


def run_adopt(petitions: int, an_rate: float | None, duplicates: int, seed: int = 5
              ) -> dict[str, Any]:
    cs = ControlShiftSim(api_key=CS_KEY, page_size=25)
    an = ActionNetworkSim(api_key=AN_KEY, requests_per_second=an_rate)
    scenario = populate(cs, an, petitions=petitions, signatures=0, unlaunched=0,
                        existing_in_an=0.0, hosted=petitions, hosted_duplicates=duplicates,
                        seed=seed)
    with tempfile.TemporaryDirectory() as tmp, ServedApp(cs.app) as cs_served, \
            ServedApp(an.app) as an_served:
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[controlshift]\nurl = "{cs_served.url}"\napi_key = "{CS_KEY}"\n\n'
            f'[action_network]\nurl = "{an_served.url}/api/v2"\napi_key = "{AN_KEY}"\n'
            f'requests_per_second = {an_rate or 10000.0}\n\n'
            f'[store]\npath = "{Path(tmp) / "csand.db"}"\n', encoding="utf-8")
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "csand", "adopt", "--json", "--config",
                               str(config)], capture_output=True, text=True, timeout=3600)
        seconds = time.monotonic() - started
        if done.returncode not in (0, 1):
            raise SystemExit(done.stdout + done.stderr)
        report = json.loads(done.stdout)
        cs.close()
    return {
        "petitions": petitions,
        "an_rate": an_rate,
        "seconds": round(seconds, 1),
        "seconds_in_adopt": report["seconds"],
        "adopted": len(report["adopted"]),
        "ambiguous": len(report["ambiguous"]),
        "create": len(report["create"]),
        "an_requests": report["an_requests"],
        "phases": report["phases"],
        "an_writes": sum(n for route, n in an.stats()["by_route"].items()
                         if not route.startswith("GET")),
        "hosted_twins": sum(len(u) for u in scenario.hosted.values()),
        "exit_code": done.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--petitions", type=int, default=5000)
    parser.add_argument("--duplicates", type=int, default=10)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    for name, rate in (("lifted", None), ("an_4_per_s", 4.0)):
        result = run_adopt(args.petitions, rate, args.duplicates)
        figures[name] = result
        print(f"{name}: csand adopt on {result['petitions']} petitions "
              f"({result['hosted_twins']} hosted AN petitions): {result['seconds']} s wall, "
              f"{result['an_requests']} AN requests, {result['an_writes']} AN writes; "
              f"{result['adopted']} adopted, {result['ambiguous']} ambiguous, "
              f"{result['create']} to create; phases {result['phases']}", flush=True)
    # The alternative not taken: csand's identifier PUT on every adopted petition up front.
    adopted = figures["an_4_per_s"]["adopted"]
    figures["eager_put_estimate_s"] = round(adopted / (4.0 * 0.97), 1)
    print(f"adding the identifier up front would cost {adopted} more requests: "
          f"{figures['eager_put_estimate_s']} s more at 4 req/s (97% of it, as csand runs)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

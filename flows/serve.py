"""Serve `build-model` as deployments: `nightly` on a cron schedule, `on-demand` without one.

Needs a Prefect API (`prefect server start --host 127.0.0.1` and PREFECT_API_URL); then
`prefect deployment run build-model/nightly --param overrides='["train.max_steps=300"]'`.
"""
from __future__ import annotations

import argparse

from prefect import serve

from flows.build_model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve")
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--cron", default="0 2 * * *", help="schedule of the nightly deployment")
    args = parser.parse_args()
    params = {"preset": args.preset, "overrides": []}
    serve(
        build_model.to_deployment(name="nightly", cron=args.cron, parameters=params),
        build_model.to_deployment(name="on-demand", parameters=params),
    )


if __name__ == "__main__":
    main()

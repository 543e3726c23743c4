"""Serve `build-model` from this process: the deployments of `prefect.yaml`, without a work pool or a worker.

`nightly` runs on the cron schedule and time zone that prefect.yaml gives it, `on-demand` only when asked; both take
their parameters from prefect.yaml too, so this path and the worker path (`make deploy` + `make worker`) serve the
same deployments. Needs a Prefect API (`make server`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`); then
`prefect deployment run build-model/on-demand --param overrides='["train.max_steps=300"]' --watch`.

A deployment of the same name that `prefect deploy` bound to a work pool is deleted first: the server updates a
deployment field by field, so a served one would keep the pool and be run by neither. `make deploy` takes them back.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from prefect import get_client, serve
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from flows.build_model import build_model
from flows.preflight import prefect_api_down
from pipeline_config import ConfigError, load_config

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The `deployments:` entries of prefect.yaml for this flow's entrypoint."""
    specs = yaml.safe_load(path.read_text(encoding="utf-8"))["deployments"]
    return [spec for spec in specs if spec["entrypoint"] == "flows/build_model.py:build_model"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="preset of every deployment (default: prefect.yaml's)")
    parser.add_argument("--cron", help="cron of the scheduled deployments (default: prefect.yaml's, e.g. '0 2 * * *')")
    parser.add_argument("--timezone", help="IANA time zone of the cron, e.g. Europe/Paris (default: prefect.yaml's)")
    args = parser.parse_args(argv)
    _check(parser, args)
    deployments = []
    for spec in deployment_specs():
        parameters = {**spec.get("parameters", {}), **({"preset": args.preset} if args.preset else {})}
        try:  # the preset and overrides each deployment will run with: a mistake shows now, not at 2 a.m.
            load_config(parameters.get("preset", "quickstart"), parameters.get("overrides") or [])
        except ConfigError as err:
            parser.exit(2, f"error: deployment {spec['name']}: {err}\n")
        schedules = [
            Cron(args.cron or schedule["cron"], timezone=args.timezone or schedule.get("timezone"))
            for schedule in spec.get("schedules") or []
        ]
        deployments.append(build_model.to_deployment(
            name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            parameters=parameters, schedules=schedules,
        ))
    down = prefect_api_down()  # after the arguments and presets: a mistake in them is named first
    if down:
        parser.exit(2, f"error: {down}\n")
    _take_over_from_work_pools([f"{build_model.name}/{deployment.name}" for deployment in deployments])
    serve(*deployments)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--cron and --timezone, each named in a one-line error (exit 2) before anything is served."""
    if args.cron:
        try:
            Cron(args.cron)
        except ValueError:
            parser.error(f"--cron {args.cron!r}: not a cron expression (five fields, e.g. '0 2 * * *')")
    if args.timezone:
        try:
            ZoneInfo(args.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            parser.error(f"--timezone {args.timezone!r}: not an IANA time zone (e.g. Europe/Paris)")


def _take_over_from_work_pools(names: list[str]) -> None:
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployed = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployed.work_pool_name:
                print(f"{name} was deployed to work pool {deployed.work_pool_name!r}; serving it from this process"
                      " instead (`make deploy` gives it back to the pool)")
                client.delete_deployment(deployed.id)


if __name__ == "__main__":
    main()

"""The command line: ``csand run``, ``csand status``, ``csand demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import anyio
import typer

from csand import config as config_mod
from csand import logs

app = typer.Typer(
    help="Keep Action Network in sync with ControlShift petitions.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="TOML config file.", envvar="CSAND_CONFIG")
]


def _load(path: Path) -> config_mod.Settings:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        typer.echo(f"csand: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from csand.daemon import AlreadyRunning, Daemon

    settings = _load(config)
    logs.configure(settings.log.level, settings.log.format, secrets=settings.secrets())
    try:
        anyio.run(Daemon(settings, config_path=config).run, backend="asyncio")
    except AlreadyRunning as exc:
        typer.echo(f"csand: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


@app.command()
def status(
    config: ConfigOption = config_mod.DEFAULT_CONFIG_PATH,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show the queue and the last poll; safe to run while ``csand run`` is running."""
    from csand.store import Store

    settings = _load(config)
    path = Path(settings.store.path)
    if not path.exists():
        typer.echo(f"csand: no database at {path} yet (has csand run started?)", err=True)
        raise typer.Exit(1)

    async def read() -> dict:
        store = await Store.open(path)
        try:
            return await store.status()
        finally:
            await store.close()

    data = anyio.run(read, backend="asyncio")
    if as_json:
        typer.echo(json.dumps(data))
        return
    from csand.report import print_status

    print_status(data)


@app.command()
def demo(
    petitions: Annotated[int, typer.Option(help="Petitions to generate.")] = 12,
    signatures: Annotated[int, typer.Option(help="Signatures to generate.")] = 400,
    rate: Annotated[float, typer.Option(help="AN requests/second (the real limit is 4).")] = 20.0,
    faults: Annotated[bool, typer.Option(help="Inject AN faults (5xx, 200 {}, drops).")] = True,
    seed: Annotated[int, typer.Option(help="Random seed for the generated data.")] = 7,
) -> None:
    """Run csand against built-in simulators of both services, with generated data."""
    from csand.demo import run_demo

    code = run_demo(petitions=petitions, signatures=signatures, rate=rate, faults=faults, seed=seed)
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

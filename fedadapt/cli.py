"""The ``fedadapt`` command line. Library commands run here; app commands import their app lazily."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer

from fedadapt.errors import FedAdaptError

app = typer.Typer(
    help="fedadapt: federated personalization of a frozen transformer with small adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USAGE_ERROR = 2


@app.callback()
def _commands() -> None:
    """Federated personalization of a frozen transformer with small adapters."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def _print_table(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info['method']} on {info['backbone']}", show_header=False)
    for key, value in info.items():
        if key == "trainable_fraction":
            value = f"{value:.4%}"
        elif isinstance(value, int) and key.endswith(("params", "bytes")):
            value = f"{value:,}"
        table.add_row(key, str(value))
    Console().print(table)


@app.command()
def info(
    method: Annotated[
        str,
        typer.Option(help="Adapter method: lora, ffa-lora, ia3, prompt, prefix, bitfit, houlsby, pfeiffer, parallel."),
    ] = "lora",
    rank: Annotated[
        int | None,
        typer.Option(help="LoRA rank, bottleneck size (houlsby/pfeiffer/parallel) or virtual tokens (prompt/prefix)."),
    ] = None,
    drop_layers: Annotated[
        int | None, typer.Option(help="AdapterDrop: no bottleneck adapters in the lowest K layers.")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="HF model folder or hub id (default: packaged MiniLM-L6).")
    ] = None,
    num_labels: Annotated[int, typer.Option(help="Classes of the classification head.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Parameter counts and sizes of an adapter method on a backbone."""
    from fedadapt.methods import make_method_config

    try:
        extra = {} if drop_layers is None else {"drop_layers": drop_layers}
        method_config = make_method_config(method, size=rank, **extra)  # fails fast, before torch loads
        from fedadapt.backbone import DEFAULT_BACKBONE, BackboneConfig
        from fedadapt.info import adapter_info

        backbone_config = BackboneConfig(name_or_path=backbone or DEFAULT_BACKBONE, num_labels=num_labels)
        result = adapter_info(method_config, backbone_config)
    except FedAdaptError as err:
        _fail(str(err))
        return
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_table(result)


def _quiet_transformers() -> None:
    """Weight-loading progress bars are noise on a command line that prints a result."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_transformers()
    app()


if __name__ == "__main__":
    main()

"""The ``fedadapt`` command line.

Library commands (info, train, keys) call fedadapt in this process. App commands (simulate, serve,
node, certs, export) run an app that sits beside fedadapt in the checkout: ``APP_MODULES`` names each one.
Every command reports a library error as one ``error: ...`` line on stderr and exit status 2 (``_reports_errors``).
Imports of torch, transformers and cryptography wait inside the commands that need them, so that
``fedadapt --help`` and a mistyped option answer at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fedadapt.errors import ConfigError, FedAdaptError
from fedadapt.fleet.run_config import LOOPBACK, MetricsEndpoint
from fedadapt.methods import make_method_config

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


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


P = ParamSpec("P")


def _reports_errors(writing: str | None = None) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Make a command print a FedAdaptError as ``error: <message>`` and exit 2, never with a traceback.

    ``writing`` names what the command writes into its ``out`` folder (e.g. "keys"): an OSError then reads
    ``cannot write keys to <out>: <reason>``. Without it an OSError is a bug and keeps its traceback.
    """

    def decorate(command: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(command)  # typer reads the options from the wrapped signature
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                command(*args, **kwargs)
            except FedAdaptError as err:
                _fail(str(err))
            except OSError as err:
                if writing is None:
                    raise
                _fail(f"cannot write {writing} to {kwargs['out']}: {err.strerror or err}")

        return run

    return decorate


# Where each app command's code lives. The apps (simulations/, deploy/, export/) are not installed: they are
# imported from the checkout that holds this fedadapt, and only when their command runs.
APP_MODULES: dict[str, str] = {
    "simulate": "simulations.runner",
    "serve": "deploy.serve",
    "node": "deploy.node",
    "node keygen": "deploy.devices",
    "certs": "deploy.certs",  # cryptography's X.509: loaded by this command only
    "export options": "export.config",  # checks the options before export.exporter loads torch
    "export": "export.exporter",
}


def _app(command: str) -> Any:
    """The module that runs ``command`` (a key of APP_MODULES), imported from the checkout holding this fedadapt."""
    name = APP_MODULES[command]
    root = Path(__file__).resolve().parent.parent
    if not (root / name.split(".")[0]).is_dir():
        _fail(f"{name} is not beside this fedadapt ({root}): app commands need an editable install of the checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def _print_table(info: dict[str, Any], title: str) -> None:
    table = Table(title=title, show_header=False)
    for key, value in info.items():
        if key == "trainable_fraction":
            value = f"{value:.4%}"
        elif isinstance(value, int) and key.endswith(("params", "bytes")):
            value = f"{value:,}"
        table.add_row(key, str(value))
    Console().print(table)


@app.command()
@_reports_errors()
def info(
    method: Annotated[
        str,
        typer.Option(
            help="Adapter method: lora, ffa-lora, ia3, prompt, prefix, bitfit, head, houlsby, pfeiffer, parallel."
        ),
    ] = "lora",
    rank: Annotated[
        int | None,
        typer.Option(help="LoRA rank, bottleneck size (houlsby/pfeiffer/parallel) or virtual tokens (prompt/prefix)."),
    ] = None,
    drop_layers: Annotated[
        int | None,
        typer.Option(help="No adapter in the lowest K layers (lora, ffa-lora, ia3 and the bottleneck methods)."),
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="HF model folder or hub id (default: packaged MiniLM-L6).")
    ] = None,
    num_labels: Annotated[int, typer.Option(help="Classes of the classification head.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Parameter counts and sizes of an adapter method on a backbone."""
    extra = {} if drop_layers is None else {"drop_layers": drop_layers}
    method_config = make_method_config(method, size=rank, **extra)  # fails fast, before torch loads
    # torch and transformers: only once the options are valid (and never for --help)
    from fedadapt.checkpoint.info import adapter_info
    from fedadapt.model.backbone import DEFAULT_BACKBONE, BackboneConfig

    backbone_config = BackboneConfig(name_or_path=backbone or DEFAULT_BACKBONE, num_labels=num_labels)
    result = adapter_info(method_config, backbone_config)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_table(result, f"{result['method']} on {result['backbone']}")


@app.command()
@_reports_errors()
def train(
    data: Annotated[
        str, typer.Option(help="CSV/JSON/JSONL file, folder with train/test files, HF folder, or 'synthetic'.")
    ],
    method: Annotated[str, typer.Option(help="Adapter method (see `fedadapt info --help`).")] = "lora",
    rank: Annotated[int | None, typer.Option(help="LoRA rank, bottleneck size or virtual tokens.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps (overrides --epochs).")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Train on a seeded sample of N examples.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Adapter learning rate.")] = 2e-3,
    head_lr: Annotated[float, typer.Option(help="Classifier head learning rate.")] = 5e-2,
    max_length: Annotated[int, typer.Option(help="Tokens per text (longer texts are truncated).")] = 64,
    text_column: Annotated[str | None, typer.Option(help="Name of the text column.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Name of the label column.")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="HF model folder or hub id (default: packaged MiniLM-L6).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for sampling, shuffling and initialization.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Adapter folder to write (with metrics.json).")] = None,
    prefix_cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the frozen lower layers' states here between runs (float16, at most 256 MiB; "
            "methods that leave layers frozen; without it they are cached in memory for the run)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object (last line).")] = False,
) -> None:
    """Train an adapter centrally (the baseline), evaluate it on the test split and save it."""
    method_config = make_method_config(method, size=rank)  # fails fast, before torch loads
    # torch and transformers: only once the method is valid (and never for --help)
    from fedadapt.data.splits import DataConfig
    from fedadapt.model.backbone import DEFAULT_BACKBONE
    from fedadapt.train.baseline import train_baseline
    from fedadapt.train.loop import TrainConfig

    data_config = DataConfig(
        path=data, text_column=text_column, label_column=label_column, max_examples=max_examples, seed=seed
    )
    train_config = TrainConfig(
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=lr,
        head_learning_rate=head_lr,
        max_length=max_length,
        seed=seed,
        device=device,
    )
    with _step_progress(f"training {method}") as on_step:
        metrics = train_baseline(
            data_config,
            method_config,
            train_config,
            backbone or DEFAULT_BACKBONE,
            out or Path("runs") / f"train-{method}",
            on_step,
            prefix_cache_dir,
        )
    if as_json:
        typer.echo(json.dumps(metrics))
    else:
        _print_table({k: v for k, v in metrics.items() if not isinstance(v, dict)}, f"{method} on {data}")


COLD_DEVICES_HELP = (
    "Let Flower start a fresh ClientApp process for every message (imports and model load each time) "
    "instead of forking it from a warm process that imported them once."
)
METRICS_PORT_HELP = "Serve Prometheus metrics of the run at http://HOST:PORT/metrics (default: off)."
METRICS_HOST_HELP = "Address the metrics port binds to; anything but loopback is reachable without TLS or a password."
DASHBOARD_HELP = "Also serve a live page of the run at http://HOST:PORT/ (needs --metrics-port)."
ACCEPT_UNVERIFIED_HELP = (
    "With --resume: also resume from checkpoints this server cannot authenticate (older formats, a lost or "
    "replaced checkpoint key). Only for files you trust."
)


@app.command()
@_reports_errors(writing="the users' files")
def synthetic(
    out: Annotated[Path, typer.Option(help="Folder for the files (one <user>.csv each; never overwritten).")],
    users: Annotated[int, typer.Option(help="Synthetic users.")] = 8,
    examples_per_user: Annotated[int, typer.Option(help="Labelled texts per user.")] = 80,
    seed: Annotated[int, typer.Option(help="The task's seed (the quickstart uses 0).")] = 0,
) -> None:
    """Write the built-in synthetic task as one text,label CSV per user (e.g. to personalize on a phone)."""
    from fedadapt.data.synthetic import SyntheticConfig, write_user_files

    config = SyntheticConfig(num_users=users, examples_per_user=examples_per_user, seed=seed)
    paths = write_user_files(config, out)
    typer.echo(f"wrote {len(paths)} users' files ({examples_per_user} texts each, labels {', '.join(config.intents)})")
    typer.echo(f"  {paths[min(paths)]} ... {paths[max(paths)]}")


@app.command()
@_reports_errors()
def simulate(
    scenario: Annotated[Path, typer.Option(help="Scenario TOML file (see simulations/README.md).")],
    rounds: Annotated[int | None, typer.Option(help="Rounds in all (overrides the scenario's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/sim-<name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
    accept_unverified_checkpoints: Annotated[bool, typer.Option(help=ACCEPT_UNVERIFIED_HELP)] = False,
    metrics_port: Annotated[int, typer.Option(help=METRICS_PORT_HELP)] = 0,
    metrics_host: Annotated[str, typer.Option(help=METRICS_HOST_HELP)] = LOOPBACK,
    dashboard: Annotated[bool, typer.Option(help=DASHBOARD_HELP)] = False,
) -> None:
    """Run a fleet scenario in Flower's simulation engine: metrics.json and final_adapter/ in --out."""
    endpoint = MetricsEndpoint(port=metrics_port, host=metrics_host, dashboard=dashboard)  # fails fast
    _app("simulate").simulate(
        scenario,
        rounds=rounds,
        out=out,
        resume=resume,
        accept_unverified=accept_unverified_checkpoints,
        endpoint=endpoint,
    )


@app.command()
@_reports_errors()
def serve(
    scenario: Annotated[Path, typer.Option("--config", help="Scenario TOML file, as for `fedadapt simulate`.")],
    rounds: Annotated[int | None, typer.Option(help="Rounds in all (overrides the scenario's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/sim-<name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
    accept_unverified_checkpoints: Annotated[bool, typer.Option(help=ACCEPT_UNVERIFIED_HELP)] = False,
    local_supernodes: Annotated[
        int, typer.Option(help="Also start this many SuperNodes on this machine over loopback (a demo).")
    ] = 0,
    host: Annotated[
        str, typer.Option(help="Address devices dial; only the Fleet API is served there (the rest stays on loopback).")
    ] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port devices dial (default: a free one).")] = None,
    certs: Annotated[
        Path | None, typer.Option(help="A `fedadapt certs` folder (default: <out>/certs, made for local nodes).")
    ] = None,
    devices: Annotated[
        Path | None,
        typer.Option(
            help="Folder of device public keys (*.pub from `fedadapt node keygen`; default: <certs>/devices)."
        ),
    ] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication: local demos only.")] = False,
    cold_devices: Annotated[bool, typer.Option(help=COLD_DEVICES_HELP)] = False,
    metrics_port: Annotated[int, typer.Option(help=METRICS_PORT_HELP)] = 0,
    metrics_host: Annotated[str, typer.Option(help=METRICS_HOST_HELP)] = LOOPBACK,
    dashboard: Annotated[bool, typer.Option(help=DASHBOARD_HELP)] = False,
) -> None:
    """Run a scenario on a real Flower SuperLink (TLS + SuperNode authentication unless --insecure)."""
    endpoint = MetricsEndpoint(port=metrics_port, host=metrics_host, dashboard=dashboard)  # fails fast
    launcher = _app("serve")
    deployment = launcher.Deployment(
        host=host,
        port=port,
        certs=certs,
        insecure=insecure,
        local_supernodes=local_supernodes,
        devices=devices,
        cold_devices=cold_devices,
    )
    launcher.serve(
        scenario,
        deployment,
        rounds=rounds,
        out=out,
        resume=resume,
        accept_unverified=accept_unverified_checkpoints,
        endpoint=endpoint,
    )


RUN_FAILED = 1  # `fedadapt status`: the run failed (2 stays a usage or input error)


@app.command()
@_reports_errors()
def status(
    folder: Annotated[Path, typer.Argument(help="The run's folder (its --out): metrics.json and status.json.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A running or finished run's state from its folder; exits 1 when the run failed."""
    from fedadapt.fleet.run_status import inspect_run

    report = inspect_run(folder)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        _print_status(report)
    if report.failed:
        raise typer.Exit(RUN_FAILED)


def _print_status(report: Any) -> None:
    """The verdict, the figures so far, and the last rounds as a table."""
    planned = "?" if report.planned is None else str(report.planned)
    typer.echo(f"{report.folder}: {report.state.upper()} ({report.why})")
    where = f", {report.stage} in round {report.round}" if report.stage and report.state == "running" else ""
    typer.echo(f"  scenario {report.scenario or '?'}, privacy {report.privacy or '?'}{where}")
    typer.echo(f"  rounds: {report.completed} of {planned} done")
    if report.accuracy is not None or report.epsilon is not None:
        accuracy = "-" if report.accuracy is None else f"{report.accuracy:.4f}"
        epsilon = "" if report.epsilon is None else f", ε {report.epsilon:.4g}"
        typer.echo(f"  last accuracy: {accuracy}{epsilon}")
    rejected = sum(report.rejected.values())
    classes = ", ".join(f"{reason} {count}" for reason, count in report.rejected.items())
    typer.echo(f"  rejected: {rejected}" + (f" ({classes})" if classes else ""))
    if report.rounds:
        table = Table(title="last rounds")
        for name in ("round", "accuracy", "ε", "accepted", "rejected", "bytes up", "seconds"):
            table.add_column(name, justify="right")
        for row in report.rounds[-10:]:
            table.add_row(
                *(_cell(row[k], f) for k, f in (("round", "{}"), ("accuracy", "{:.4f}"), ("epsilon", "{:.3g}"))),
                f"{_cell(row['accepted'], '{}')}/{_cell(row['clients'], '{}')}",
                *(_cell(row[k], f) for k, f in (("rejected", "{}"), ("bytes_up", "{:,}"), ("seconds", "{:.1f}"))),
            )
        Console().print(table)


def _cell(value: Any, form: str) -> str:
    return "-" if value is None else form.format(value)


node_app = typer.Typer(
    help="Join a federation as one device (a Flower SuperNode running fedadapt's ClientApp), or make its key.",
    invoke_without_command=True,
)
app.add_typer(node_app, name="node")


@node_app.callback()
@_reports_errors()
def node(
    ctx: typer.Context,
    superlink: Annotated[str | None, typer.Option(help="The server's HOST:PORT (its gateway).")] = None,
    partition_id: Annotated[
        int | None, typer.Option(help="Which part of the scenario's data this device trains on.")
    ] = None,
    num_partitions: Annotated[int | None, typer.Option(help="How many parts the data is split into.")] = None,
    root_certificates: Annotated[Path | None, typer.Option(help="The CA certificate (ca.crt).")] = None,
    auth_key: Annotated[
        Path | None, typer.Option(help="This device's private key (from `fedadapt node keygen`).")
    ] = None,
    trusted_entities: Annotated[
        Path | None,
        typer.Option(help="The server's trusted-entities.yaml: only FABs signed by these identities run here."),
    ] = None,
    roster: Annotated[
        Path | None, typer.Option(help="The devices' public keys, one a line (the server's roster.pub), for SecAgg+.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the device keeps its personal part and cached states.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="The device's own CSV/JSON/JSONL data (default: its partition of the scenario's data)."),
    ] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication: local demos only.")] = False,
    require_privacy: Annotated[
        str,
        typer.Option(help="The weakest privacy mode this device takes part in: none, aead or secagg+."),
    ] = "none",
    prefix_cache_mb: Annotated[
        float | None,
        typer.Option(
            help="MiB the cached states of the frozen lower layers may take in --state-dir (default 256; "
            "0: recompute them every round)."
        ),
    ] = None,
    cold_devices: Annotated[bool, typer.Option(help=COLD_DEVICES_HELP)] = False,
    require_dp: Annotated[
        bool,
        typer.Option(
            help="Take part only in runs with distributed differential privacy: this device adds its own noise "
            "share before its delta leaves it (needs --require-privacy secagg+)."
        ),
    ] = False,
) -> None:
    """Join a federation as one device: a Flower SuperNode that runs fedadapt's ClientApp."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, v in [("--superlink", superlink), ("--partition-id", partition_id),
                                    ("--num-partitions", num_partitions)] if v is None]  # fmt: skip
    if missing:
        _fail(f"fedadapt node needs {', '.join(missing)} (or the subcommand `keygen`)")
    launcher = _app("node")
    config = launcher.NodeConfig(
        superlink=superlink,
        partition_id=partition_id,
        num_partitions=num_partitions,
        root_certificates=root_certificates,
        auth_key=auth_key,
        trusted_entities=trusted_entities,
        roster=roster,
        insecure=insecure,
        state_dir=state_dir,
        data=data,
        require_privacy=require_privacy,
        prefix_cache_mb=prefix_cache_mb,
        cold=cold_devices,
        require_dp=require_dp,
    )
    raise typer.Exit(launcher.run_node(config))


@node_app.command("keygen")
@_reports_errors(writing="the device key")
def node_keygen(
    out: Annotated[Path, typer.Option(help="Folder for <name>.key (mode 0600, stays here) and <name>.pub.")],
    name: Annotated[str, typer.Option(help="File name and key comment, e.g. device-3.")] = "device",
) -> None:
    """Make this device's authentication key on the device; never overwrites. Prints only the public key."""
    made = _app("node keygen").keygen(out, name)
    typer.echo(f"private key: {made.private_path} (stays on this device; mode 0600)")
    typer.echo(f"public key:  {made.public_path} (give this file to the server operator)")
    typer.echo(made.public_line)


@app.command("export")
@_reports_errors()
def export_command(
    adapter: Annotated[Path, typer.Option(help="Adapter folder to export (from `fedadapt train` or a simulation).")],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder to write the graph, tokenizer, labels, manifest and report to. With --mode swappable, an "
            "existing swappable bundle gains this adapter (its layout must match)."
        ),
    ],
    backbone: Annotated[
        str | None, typer.Option(help="Backbone folder or hub id (default: the one the adapter records).")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="merged: one model.onnx with the adapter built in. swappable: a shared backbone.onnx plus "
            "adapters/<name>.onnx_adapter per user, switched at run time (not for full, stack or fusion)."
        ),
    ] = "merged",
    adapter_name: Annotated[
        str | None,
        typer.Option(help="Swappable only: the adapter's name in the bundle (default: the adapter folder's name)."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset, 17 to 20.")] = 17,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace a non-empty --out once the new export succeeded; when adding to a swappable bundle, "
            "replace an adapter of the same name."
        ),
    ] = False,
    texts: Annotated[
        Path | None, typer.Option(help="Text file, one text per line, for the parity check (default: built-in).")
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: also write an ONNX Runtime dynamically quantized graph (*.int8.onnx) beside the fp32 one; "
            "swappable bundles keep the per-user adapter inputs fp32. Its agreement with PyTorch is reported. "
            "With --on-device-training the prefix gets an int8 copy too (on_device/prefix.int8.onnx)."
        ),
    ] = None,
    ort_format: Annotated[
        bool,
        typer.Option("--ort", help="Also write an ORT-format (.ort) copy of every graph, for ONNX Runtime Mobile."),
    ] = False,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled CSV/JSON/JSONL file or folder (as `fedadapt train` reads it): report the graphs' accuracy "
            "on its test split, fp32 against int8."
        ),
    ] = None,
    on_device_training: Annotated[
        bool,
        typer.Option(
            help="Swappable only: also write the graphs a phone trains this user's personal part with (the frozen "
            "prefix as ONNX, a training step as ONNX and as an ExecuTorch .pte); train with export/phone_trainer.py."
        ),
    ] = False,
    train_layers: Annotated[
        int,
        typer.Option(help="With --on-device-training: the top layers whose adapter trains on the phone (0: the head)."),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Export an adapter with its backbone to ONNX for phones, checked against PyTorch."""
    config_module = _app("export options")
    extra: dict[str, Any] = {} if texts is None else {"texts": _read_texts(texts)}
    if on_device_training:
        extra["on_device"] = config_module.OnDeviceConfig(train_layers=train_layers)
    elif train_layers:
        raise ConfigError("--train-layers sets what trains on the phone: add --on-device-training")
    config = config_module.ExportConfig(
        adapter=adapter,
        out=out,
        backbone=backbone,
        mode=mode,
        opset=opset,
        force=force,
        adapter_name=adapter_name,
        quantize=quantize,
        ort=ort_format,
        eval_data=eval_data,
        **extra,
    )  # fails fast, before torch loads
    report = _app("export").export_adapter(config)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        _print_table(report.summary(), f"{report.method} exported to {out}")


keys_app = typer.Typer(help="The server's X25519 key pair for encrypted payloads.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
@_reports_errors(writing="keys")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Folder for server.key (mode 0600) and server.pub (0644).")],
) -> None:
    """Generate the server's key pair; never overwrites. Prints the paths and the public key's fingerprint."""
    from fedadapt.privacy.keys import generate_server_keys  # cryptography: loaded by this command only

    files = generate_server_keys(out)
    typer.echo(f"private key: {files.private_path} (keep it secret; mode 0600)")
    typer.echo(f"public key:  {files.public_path}")
    typer.echo(f"fingerprint: {files.fingerprint}")


@app.command("certs")
@_reports_errors(writing="certificates")
def certs_command(
    out: Annotated[Path, typer.Option(help="Folder for ca.*, superlink.*, server-identity.* (private keys 0600).")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="IP address or DNS name devices reach the server by; repeat for more (default: loopback)."),
    ] = None,
    validity_days: Annotated[int, typer.Option(help="Days the certificates stay valid.")] = 825,
) -> None:
    """TLS certificates and the server's FAB-signing identity; never overwrites. Prints paths, not keys.

    Device keys are made on each device (`fedadapt node keygen`); only their public keys come here.
    """
    made = _app("certs")
    certs = made.generate_deployment_certs(out, tuple(host or ("127.0.0.1", "localhost")), validity_days)
    typer.echo(f"CA certificate:        {certs.ca_cert}  (SHA-256 {certs.ca_fingerprint})")
    typer.echo(f"CA private key:        {certs.ca_key}  (secret, mode 0600; keep it offline)")
    typer.echo(f"SuperLink certificate: {certs.server_cert}  (for {', '.join(certs.hosts)})")
    typer.echo(f"SuperLink private key: {certs.server_key}  (secret, mode 0600)")
    typer.echo(f"server identity:       {certs.identity_key}  (secret, mode 0600; signs the FAB the server runs)")
    typer.echo(f"trusted entities:      {certs.trusted_entities}  (copy to every device)")
    typer.echo("next:")
    for line in made.next_commands(certs):
        typer.echo(f"  {line}")


def _read_texts(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read --texts {path}: {err}") from err
    return [line.strip() for line in lines if line.strip()]


@contextlib.contextmanager
def _step_progress(description: str) -> Iterator[Callable[[int, int, float], None]]:
    """A rich progress bar on stderr fed by a training step callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=None, loss="-")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, loss=f"{loss:.3f}")

        yield on_step


def _quiet_transformers() -> None:
    """Weight-loading progress bars are noise on a command line that prints a result."""
    from transformers.utils import logging as hf_logging  # about a second: the console script pays it, not importers

    hf_logging.disable_progress_bar()


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_transformers()
    app()


if __name__ == "__main__":
    main()

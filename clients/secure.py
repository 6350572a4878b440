"""The ClientApp's SecAgg+ stages: carry the session in ``context.state`` and payloads in and out of messages.

The protocol itself is ``fedadapt.privacy.secagg.client``; training is ``fedadapt.fleet.device_round``. Only the
``masked`` stage loads the model (torch is imported there and nowhere else in these stages).
The device signs with its own identity key and trusts only the identities of its roster (both
files of the device's own configuration, never of the run config).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict

from clients.device import Device
from fedadapt.errors import ConfigError, FedAdaptError, SecAggError
from fedadapt.fleet import protocol
from fedadapt.fleet.run_config import FleetRun
from fedadapt.privacy.secagg import client as secagg_client
from fedadapt.privacy.secagg import stages, wire
from fedadapt.privacy.secagg.identity import Identity, load_identity
from fedadapt.privacy.transport import ClientSealer

if TYPE_CHECKING:
    from fedadapt.fleet.device_round import LocalUpdate

_SESSION_FIELD = "session"
# Metrics that reveal (or are derived from) the example count: under secagg+ they stay on the device.
COUNT_METRICS = ("train-steps", "train-seconds", "test-examples", "prefix-cache-seconds")


def message_round(config: ConfigRecord, error: type[FedAdaptError]) -> int:
    """The round a server message names: an integer in [0, 2**64), else ``error`` (never OverflowError)."""
    return wire.uint64(config.get(protocol.SERVER_ROUND), f"the message's {protocol.SERVER_ROUND}", error)


def run_stage(msg: Message, context: Context, run: FleetRun, sealer: ClientSealer, device: Device) -> Message:
    """Answer one SecAgg+ stage message; the round's secrets stay in ``context.state``."""
    config = msg.content.config_records[protocol.CONFIG]
    stage = config.get(protocol.SECAGG_STAGE)
    server_round = message_round(config, SecAggError)
    schema_id = str(config.get(protocol.SCHEMA_ID))
    request = payload_bytes(msg, protocol.SECAGG_PAYLOAD)
    saved = _saved_session(context)
    privacy = run.scenario.privacy
    metrics: dict[str, MetricRecordValues] = {}
    if stage == stages.SETUP:
        identity = device_identity(device, context)
        step = secagg_client.setup(privacy, server_round, context.node_id, request, identity, saved=saved)
    elif stage == stages.SHARE_KEYS:
        step = secagg_client.share_keys(privacy, server_round, saved, request, device_identity(device, context))
    elif stage == stages.MASKED:
        # Check the neighbours' shares before spending a round of training on them.
        session = secagg_client.receive_shares(privacy, server_round, saved, request)
        update = _train(msg, run, device, server_round)
        vector, norm_clipped = _delta_vector(update, run.scenario.max_delta_norm)
        # The server can only check the total: an honest device keeps its own weight within the cap.
        num_examples = min(update.num_examples, run.scenario.max_examples_per_client)
        if privacy.dp is not None:  # clipped (and noised, distributed) here: the server only sees the sum
            vector = _private_vector(vector, run, config.get(protocol.DP_CLIP), server_round)
            num_examples = 1  # DP-FedAvg: every device weighs the same, whatever its data
        step = secagg_client.mask(privacy, server_round, session, vector, num_examples)
        schema_id = update.schema.schema_id
        metrics = {k: v for k, v in update.metrics.items() if k not in COUNT_METRICS}  # the count is masked
        if privacy.dp is None:  # under DP whether this delta was clipped is the adaptive clip's private bit
            metrics["norm-clipped"] = int(norm_clipped)
    elif stage == stages.CONSISTENCY:
        step = secagg_client.consistency(server_round, saved, request, device_identity(device, context))
    elif stage == stages.UNMASK:
        step = secagg_client.unmask(privacy, server_round, saved, request)
    else:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r:.60}: client and server versions differ")
    context.state[protocol.SECAGG_SESSION] = ConfigRecord({_SESSION_FIELD: step.session})
    sealed = sealer.seal(step.reply, server_round, schema_id, stage)
    content = RecordDict({protocol.ARRAYS: ArrayRecord({protocol.SECAGG_PAYLOAD: bytes_array(sealed)})})
    if metrics:
        content[protocol.METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def device_identity(device: Device, context: Context) -> Identity:
    """The device's identity for this run; ConfigError saying what to configure when it has none."""
    if device.identity_key is None or device.roster is None:
        raise ConfigError(
            "secagg+ needs this device's identity key and roster: set the node config keys identity-key (its "
            "OpenSSH ECDSA P-384 private key, the one its SuperNode authenticates with) and roster (the fleet's "
            "public keys, one per line), or FEDADAPT_DEVICE_ROOT for simulations "
            "(<root>/device-<partition-id>/identity.key and <root>/roster.pub)"
        )
    return load_identity(device.identity_key, device.roster, context.run_id)


def bytes_array(blob: bytes) -> Array:
    """Bytes as a uint8 Array: Flower chunks large arrays on the wire (np.save format, no pickle)."""
    return Array(np.frombuffer(blob, dtype=np.uint8))


def payload_bytes(msg: Message, key: str) -> bytes:
    return msg.content.array_records[protocol.ARRAYS][key].numpy().tobytes()


def _saved_session(context: Context) -> bytes:
    record = context.state.config_records.get(protocol.SECAGG_SESSION)
    return bytes(record[_SESSION_FIELD]) if record is not None else b""  # type: ignore[arg-type]


def _train(msg: Message, run: FleetRun, device: Device, server_round: int) -> LocalUpdate:
    # Imported here: the round loads torch, which the other stages never need.
    from fedadapt.fleet.device_round import empty_client_update, train_client_update

    fleet_device = device.in_scenario(run.scenario)
    if run.empty_clients:
        return empty_client_update(fleet_device)
    return train_client_update(fleet_device, payload_bytes(msg, protocol.ADAPTER_STATE), server_round)


def _private_vector(vector: np.ndarray, run: FleetRun, server_clip: object, server_round: int) -> np.ndarray:
    """The device's DP vector (fedadapt.privacy.dp.device): every parameter but the clip norm from its own scenario.

    The noise was sized for the scenario's rounds: a round beyond them would spend privacy nobody planned for.
    """
    from fedadapt.privacy.dp.device import needed_clipping_range, private_vector, round_clip  # DP runs only

    scenario = run.scenario
    dp = scenario.privacy.dp
    assert dp is not None
    if server_round > scenario.rounds:
        raise SecAggError(
            f"round {server_round} is beyond the scenario's {scenario.rounds}: the DP noise was planned for those; "
            "this device does not take part"
        )
    try:
        clip = round_clip(dp, server_clip)
    except ConfigError as err:
        raise SecAggError(f"the server's round config is unusable for DP: {err}") from None
    sizes = (scenario.num_clients, scenario.sample_size, scenario.rounds)
    needed = needed_clipping_range(dp, clip, *sizes)
    if scenario.privacy.clipping_range < needed:
        raise SecAggError(
            f"privacy clipping-range {scenario.privacy.clipping_range:g} would clip this device's DP values (clip "
            f"norm {clip:g} and noise): it needs at least {needed:.4g}; this device does not take part"
        )
    return private_vector(vector, dp, clip, *sizes)


def _delta_vector(update: LocalUpdate, max_norm: float | None) -> tuple[np.ndarray, bool]:
    """The delta as one float64 vector, scaled down to ``max_norm`` here: the server cannot check it masked."""
    from fedadapt.delta.state import flatten_state  # loads torch: the masked stage only

    vector = flatten_state(update.delta, update.schema.specs("shared")).numpy()
    norm = float(np.linalg.norm(vector))
    if max_norm is not None and math.isfinite(norm) and norm > max_norm:
        return vector * (max_norm / norm), True
    return vector, False

"""The server's round loop on a Flower grid: sample, send the global adapter, validate and average deltas.

Each round: wait for enough connected clients, sample ``clients_per_round`` of them with a seeded
RNG (under secagg+ from a fresh per-run secret instead, so colluding clients cannot predict the
sample or their neighbours from the public scenario seed), send the global shared state
(uncompressed), validate every returned delta and stream their example-weighted mean into the
server optimizer (``fedadapt.aggregate.fedavg``; rejected clients are logged and left out, the round
completes), evaluate the global model on the server's test split,
checkpoint atomically and rewrite ``metrics.json``. A run resumes from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedadapt.aggregate.dp_rounds import RECORD_KEY, DpRounds, DpSum
from fedadapt.aggregate.fedavg import Averager, ReceivedDelta, RoundStep, aggregate_round
from fedadapt.aggregate.server_optimizers import ServerOptimizer
from fedadapt.aggregate.server_training import load_proxy, train_on_proxy
from fedadapt.aggregate.validation import REASON_LIMIT, DeltaValidator
from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.checkpoint.folder import save_adapter
from fedadapt.checkpoint.initial_head import initial_head_state
from fedadapt.checkpoint.key import load_or_create_checkpoint_key, read_checkpoint_key
from fedadapt.checkpoint.rounds import (
    Checkpoint,
    load_latest_checkpoint,
    rng_state_from_json,
    rng_state_to_json,
    save_checkpoint,
)
from fedadapt.delta.serialize import max_blob_size, serialize_state
from fedadapt.delta.state import State, check_state
from fedadapt.errors import EmptyAggregateError, EnvelopeError, ReplyError, SchemaMismatch
from fedadapt.fleet import protocol
from fedadapt.fleet.build import build_model, encode_split
from fedadapt.fleet.data import load_fleet_data
from fedadapt.fleet.resources import memory_record
from fedadapt.fleet.run_config import FINAL_ADAPTER, FleetRun
from fedadapt.privacy.transport import ServerOpener, sealed_delta_overhead
from fedadapt.train.loop import TrainConfig, evaluate
from fedadapt.train.prototypes import PrototypeHeadStep, label_name_basis
from server.replies import (
    DeltaReply,
    bytes_to_array,
    client_error_reason,  # noqa: F401  (re-exported: callers and tests read reasons from here)
    envelope_reason,
    late_reason,
    read_delta_reply,
    reply_stream,
    unexpected_reason,
)
from server.run_state import (
    AGGREGATING,
    CHECKPOINTING,
    EVALUATING,
    FAILED,
    FINISHED,
    STOPPED,
    TRAINING,
    WAITING,
    RoundObserver,
)
from server.secure_round import run_secure_round

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


class Federation:
    """The global state, the server optimizer and the history of one run."""

    def __init__(self, run: FleetRun, run_id: int = 0) -> None:
        self.run = run
        self.scenario = run.scenario
        self.privacy = run.scenario.privacy
        self.opener = ServerOpener(self.privacy, run_id, run.server_key, run.server_public_key)
        fleet = load_fleet_data(self.scenario)
        self.model = build_model(self.scenario, fleet.labels.names)
        self.schema = self.model.schema
        self.test_set = encode_split(self.model, fleet.splits.test, fleet.labels, self.scenario.max_length)
        self.proxy = self._load_proxy(fleet.labels)
        self.blob_limit = max_blob_size(self.schema, "shared", self.scenario.compression)  # type: ignore[arg-type]
        self.validator = DeltaValidator(self.schema, max_norm=self.scenario.max_delta_norm, max_bytes=self.blob_limit)
        self.optimizer = ServerOptimizer(self.scenario.server_optimizer_config(), self.schema)
        self.rng = random.Random(self.scenario.seed)
        self.run_id = run_id
        # SecAgg+ and DP draw each round's sample (and SecAgg+ its neighbour ring) from this, not from the public
        # seed: colluding clients must not predict them, and DP's amplification by sampling needs a secret sample.
        # Kept in the checkpoint so a resumed run goes on with it.
        self.run_secret: bytes | None = secrets.token_bytes(32) if self.secret_sampling else None
        self.global_state: State = self.model.state("shared")
        if self.scenario.initial_head:  # a head warm start (a resumed run's checkpoint replaces it)
            self.global_state |= initial_head_state(self.model, self.scenario.initial_head, self.scenario.backbone)
        self.history: list[dict[str, Any]] = []
        # Client-level differential privacy ([privacy.dp]): the noise is fixed (or solved) here, before round 1.
        dp, scenario = self.privacy.dp, self.scenario
        self.dp = None if dp is None else DpRounds(dp, scenario.num_clients, scenario.sample_size, scenario.rounds)
        if self.dp is not None and self.privacy.secure_aggregation:
            values = self.schema.num_params("shared") + self.dp.extra_values
            self.dp.secure(self.privacy.clipping_range, self.privacy.quantization_step, values)
        self.stopped: str | None = None  # why the run ended before its planned rounds (max-epsilon)
        self._started = False  # whether this process has run a round yet (the first waits for the fleet)
        self._key: bytes | None = None  # the checkpoint key, read or made when the first checkpoint is written
        self.observers: list[RoundObserver] = []  # told each stage and round (metrics endpoint, status file)

    @property
    def secret_sampling(self) -> bool:
        """Whether each round's sample is drawn from the run secret (secagg+, DP) rather than the public seed."""
        return self.privacy.secure_aggregation or self.privacy.dp is not None

    @property
    def completed_rounds(self) -> int:
        return len(self.history)

    # --- resume -------------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the latest checkpoint in the out dir, if there is one."""
        checkpoint = load_latest_checkpoint(
            self.run.out_dir, read_checkpoint_key(self.run.keys_dir), self.run.accept_unverified_checkpoints
        )
        if checkpoint is None:
            logger.info("no checkpoint in %s: starting at round 1", self.run.out_dir)
            return
        if checkpoint.schema_id != self.schema.schema_id:
            raise SchemaMismatch(
                f"the checkpoint in {self.run.out_dir} was made for adapter schema {checkpoint.schema_id}, this "
                f"scenario builds {self.schema.schema_id}: resume with the scenario that started the run"
            )
        specs = self.schema.specs("shared")
        check_state(checkpoint.global_state, specs, what="checkpointed global state")
        self.global_state = {s.name: checkpoint.global_state[s.name] for s in specs}
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.rng.setstate(rng_state_from_json(checkpoint.rng_state))
        if self.secret_sampling and checkpoint.run_secret is not None:
            self.run_secret = checkpoint.run_secret
        self.history = checkpoint.history
        if self.dp is not None:
            self.dp.resume(self.history)  # the accountant and the clip norm, from the rounds' dp records
        logger.info("resumed %s after round %d", self.run.out_dir, checkpoint.round)

    # --- rounds -------------------------------------------------------------------------------------------------

    def run_rounds(self, grid: Grid) -> None:
        """Run the remaining rounds, checkpointing after each, then write the final adapter and metrics."""
        try:
            self._run_rounds(grid)
        except BaseException:
            self._notify(lambda o: o.stage(FAILED, self.completed_rounds))
            raise
        self._notify(lambda o: o.stage(STOPPED if self.stopped else FINISHED, self.completed_rounds))

    def _run_rounds(self, grid: Grid) -> None:
        for server_round in range(self.completed_rounds + 1, self.scenario.rounds + 1):
            try:
                record = self.run_round(grid, server_round)
            except BudgetSpent as spent:
                self.stopped = str(spent)
                logger.warning("stopping before round %d: %s", server_round, spent)
                break
            self._notify(lambda o: o.stage(CHECKPOINTING, server_round))  # noqa: B023  (called at once)
            self.history.append(record)
            save_checkpoint(self.run.out_dir, self._checkpoint(), self._checkpoint_key())
            self.write_metrics(complete=False)
            self._notify(lambda o: o.round_finished(record, self.completed_rounds))  # noqa: B023  (called at once)
            logger.info("round %d: %s", server_round, _round_line(record))
        self.model.load_state(self.global_state, "shared")
        save_adapter(self.model, self.run.out_dir / FINAL_ADAPTER)
        self.write_metrics(complete=True)

    def _notify(self, tell: Callable[[RoundObserver], None]) -> None:
        """Tell every observer; one that fails is logged and never ends the round."""
        for observer in self.observers:
            try:
                tell(observer)
            except Exception:
                logger.exception("round observer %s failed", type(observer).__name__)

    def run_round(self, grid: Grid, server_round: int) -> dict[str, Any]:
        """One round, plain or secure: returns its metrics record."""
        start = time.perf_counter()
        # The first round of this process waits for the fleet to join; later rounds wait a little for lost
        # devices to come back, then go on with those there are (at least min-clients).
        first = not self._started
        self._started = True
        timeout = self.scenario.node_timeout if first else self.scenario.rejoin_timeout
        minimum = max(self.scenario.min_clients, 2 if self.privacy.secure_aggregation else 1)
        self._notify(lambda o: o.stage(WAITING, server_round))
        nodes = wait_for_nodes(grid, self.scenario.sample_size, timeout, minimum=None if first else minimum)
        rng = random.Random(self._secret_seed(server_round, "sampling")) if self.run_secret else self.rng
        sampled = sorted(rng.sample(sorted(nodes), min(self.scenario.sample_size, len(nodes))))
        self._notify(lambda o: o.round_sampled(server_round, len(nodes), len(sampled)))
        fewest = max(self.scenario.min_clients, 2 if self.privacy.secure_aggregation else 1)  # a round's fewest
        if self.dp is not None and self.dp.exceeds_budget(len(nodes), len(sampled), min_survivors=fewest):
            budget = self.dp.config.max_epsilon
            raise BudgetSpent(
                f"one more round would take ε above max-epsilon {budget} (ε = {self.dp.epsilon:.4g} after "
                f"{self.completed_rounds} rounds); the last round's checkpoint and adapter are kept"
            )
        self.opener.start_round(server_round)
        record: dict[str, Any] = {"round": server_round, "clients": len(sampled)}
        if server_round == 1 and self.scenario.server_warmup_epochs:
            record["server_warmup"] = self._train_on_proxy(self.scenario.server_warmup_epochs, 0, "warm start")
        blob = serialize_state(self.global_state, self.schema, "shared", "none")
        self._notify(lambda o: o.stage(TRAINING, server_round))
        if self.privacy.secure_aggregation:
            record, client_metrics = self._secure_round(grid, sampled, server_round, blob, record, len(nodes))
        else:
            averager = None if self.dp is None else self.dp.central_sum(self.schema, len(sampled))
            record, client_metrics = self._plain_round(grid, sampled, server_round, blob, record, averager)
            if self.dp is not None:
                bits = cast(DpSum, averager).clipped_bits
                aggregated = record["accepted"] > 0
                record[RECORD_KEY] = self.dp.finish_round(len(nodes), len(sampled), aggregated, clipped_bits=bits)
                record["epsilon"] = record[RECORD_KEY]["epsilon"]
        self._notify(lambda o: o.stage(AGGREGATING, server_round))  # replies in and folded: server fine-tuning next
        if self.scenario.server_finetune_epochs and record["accepted"]:
            epochs = self.scenario.server_finetune_epochs
            record["server_finetune"] = self._train_on_proxy(epochs, server_round, "fine-tuning")
        self._notify(lambda o: o.stage(EVALUATING, server_round))
        record |= self._evaluate(client_metrics)
        record["client_results"] = client_metrics
        record["seconds"] = time.perf_counter() - start
        record |= memory_record()
        return record

    def _plain_round(
        self,
        grid: Grid,
        sampled: list[int],
        server_round: int,
        blob: bytes,
        record: dict[str, Any],
        averager: Averager | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send the global state, open and validate each delta, stream the weighted mean into the optimizer."""
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord({protocol.ADAPTER_STATE: bytes_to_array(blob)}),
                protocol.CONFIG: ConfigRecord(
                    {
                        protocol.SERVER_ROUND: server_round,
                        protocol.SCHEMA_ID: self.schema.schema_id,
                        protocol.COMPRESSION: "none",
                    }
                ),
            }
        )
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in sampled]
        plan = ReplyPlan(
            opener=self.opener,
            validator=self.validator,
            optimizer=self._round_step(server_round),
            server_round=server_round,
            timeout=self.scenario.round_timeout,
            max_payload=self.payload_limit,
            min_clients=self.scenario.min_clients,
            max_examples=self.scenario.max_examples_per_client,
            averager=averager,
        )
        sent = time.perf_counter()
        arrivals = reply_stream(grid, messages, self.scenario.round_timeout)
        self.global_state, fields, client_metrics = fold_plain_replies(arrivals, self.global_state, plan)
        record["exchange_seconds"] = fields.pop("finished") - sent  # sent until the last reply (or the deadline)
        record |= {"bytes_down": len(blob) * len(sampled)} | fields
        return record, client_metrics

    @property
    def payload_limit(self) -> int:
        """The most bytes a client's delta payload may have: the largest legal blob, sealed when the mode seals."""
        overhead = sealed_delta_overhead(self.schema.schema_id) if self.privacy.sealed else 0
        return self.blob_limit + overhead

    def _secure_round(
        self, grid: Grid, sampled: list[int], server_round: int, blob: bytes, record: dict[str, Any], population: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """SecAgg+: the server learns only the sum; below min-clients contributors the state stays as it was.

        Under [privacy.dp] every device sends its clipped delta (noised, in distributed mode) with weight 1, and
        the adaptive clip's centred bit as one more value; the server releases the noised sum / devices sampled.
        """
        outcome = run_secure_round(
            grid,
            sampled,
            server_round,
            privacy=self.privacy,
            schema=self.schema,
            opener=self.opener,
            global_blob=blob,
            timeout=self.scenario.round_timeout,
            seed=self._secret_seed(server_round, "ring"),
            run_id=self.run_id,
            max_examples_per_client=self.scenario.max_examples_per_client,
            extra_values=0 if self.dp is None else self.dp.extra_values,
            stage_config={} if self.dp is None else {protocol.DP_CLIP: self.dp.clip},
        )
        record |= outcome.record
        if self.dp is not None:
            decoded = outcome.vector is not None  # the server learnt the round's (noised) sum
            outcome.mean, unclipped = self._private_mean(outcome, record, len(sampled))
            aggregated = outcome.mean is not None and record["accepted"] >= self.scenario.min_clients
            # Distributed DP protects against the server itself: a sum it decoded is spent, applied or not.
            spent = decoded if self.dp.config.mode == "distributed" else aggregated
            record[RECORD_KEY] = self.dp.finish_round(
                population,
                len(sampled),
                spent,
                unclipped=unclipped if aggregated else None,
                survivors=record["accepted"] if spent else None,
            )
            record["epsilon"] = record[RECORD_KEY]["epsilon"]
        if outcome.mean is not None and record["accepted"] < self.scenario.min_clients:
            minimum = self.scenario.min_clients
            record["error"] = f"only {record['accepted']} clients are in the sum, fewer than min-clients ({minimum})"
            logger.warning("round %d: %s; the global state stays as it was", server_round, record["error"])
        elif outcome.mean is not None:
            self.global_state = self._round_step(server_round).step(self.global_state, outcome.mean)
        if outcome.mean is None or "error" in record:
            record["accepted"] = 0
        record["rejected"] = [
            {"client": d["client"], "reason": f"{d['stage']}: {d['reason']}"} for d in record["dropped"]
        ]
        return record, outcome.client_metrics

    def _round_step(self, server_round: int) -> RoundStep:
        """The server optimizer, or in a prototype round (``head-fit = "prototypes"``) the head fitted from the
        round's mean class statistic, projected onto the class names' span if ``prototype-basis`` says so."""
        if not self.scenario.prototype_round(server_round):
            return self.optimizer
        basis = None
        if self.scenario.prototype_basis == "label-names":
            basis = label_name_basis(self.model, self.model.labels, self.scenario.max_length)
        return PrototypeHeadStep(self.schema, basis)

    def _private_mean(self, outcome: Any, record: dict[str, Any], sampled: int) -> tuple[State | None, float | None]:
        """The DP mean of a secure round (None when the round released nothing) and its noised unclipped fraction.

        Each device weighs 1 under DP, so the decoded example total must equal the devices in the sum: a larger
        one means a device claimed more weight than the DP analysis allows, and the round is refused.
        """
        assert self.dp is not None
        if outcome.vector is None:
            return None, None
        if record["total_examples"] != record["accepted"]:
            record["error"] = (
                f"under DP every device weighs 1, but the sum carries a weight of {record['total_examples']} for "
                f"{record['accepted']} devices: a device claimed more; the round is left out"
            )
            logger.warning("round %s: %s", record["round"], record["error"])
            return None, None
        flat_sum = outcome.vector * record["accepted"]  # SecAgg+ decodes the mean over the weights: 1 each
        return self.dp.secure_sum(flat_sum, self.schema.specs("shared"), sampled)

    def _round_seed(self, server_round: int) -> int:
        """The server's own seed for a round (the SecAgg+ ring, proxy training): reproducible per scenario seed."""
        return self.scenario.seed * 1_000_003 + server_round

    def _secret_seed(self, server_round: int, purpose: str) -> int:
        """A 64-bit seed for ``purpose`` in ``server_round``: HMAC-SHA256 under the run secret (secagg+)."""
        if self.run_secret is None:
            return self._round_seed(server_round)
        message = f"fedadapt.federation.{purpose}.round-{server_round}".encode()
        return int.from_bytes(hmac.new(self.run_secret, message, hashlib.sha256).digest()[:8], "little")

    def _load_proxy(self, labels: Any) -> Any:
        """The server's labelled proxy set, encoded once; None without ``server-proxy-data``."""
        if not self.scenario.server_proxy_data:
            return None
        return load_proxy(
            self.model,
            self.scenario.server_proxy_data,
            labels,
            self.scenario.max_length,
            text_column=self.scenario.text_column,
            label_column=self.scenario.label_column,
        )

    def _train_on_proxy(self, epochs: int, server_round: int, what: str) -> dict[str, Any]:
        """Train the global shared state on the proxy set (on the server's GPU when it has one)."""
        config = TrainConfig(
            epochs=epochs,
            batch_size=self.scenario.batch_size,
            learning_rate=self.scenario.learning_rate,
            head_learning_rate=self.scenario.head_learning_rate,
            max_length=self.scenario.max_length,
            seed=self._round_seed(server_round),
            device=self.scenario.server_device,
        )
        run = train_on_proxy(self.model, self.global_state, self.proxy, config)
        self.global_state = run.state
        logger.info("server %s: %d steps on %s, %.0f examples/s", what, run.steps, run.device, run.examples_per_second)
        return run.record(what)

    def _evaluate(self, client_metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """Central accuracy of the global model, when it has a shared head; the clients' own accuracy always."""
        limit = self.scenario.max_examples_per_client
        scores: dict[str, Any] = {"client_accuracy": _weighted_accuracy(client_metrics, limit)}
        if self.scenario.personal_head:
            # The head is personal: the global model has no trained head to score centrally.
            return scores | {"accuracy": scores["client_accuracy"], "loss": None, "macro_f1": None}
        self.model.load_state(self.global_state, "shared")
        result = evaluate(self.model, self.test_set, device=self.scenario.server_device)
        self.model.to("cpu")
        return scores | {"accuracy": result.accuracy, "loss": result.loss, "macro_f1": result.macro_f1}

    def _checkpoint_key(self) -> bytes:
        """The key that authenticates this run's checkpoints (made 0600 in <out>/keys on first use)."""
        if self._key is None:
            self._key = load_or_create_checkpoint_key(self.run.keys_dir)
        return self._key

    def _checkpoint(self) -> Checkpoint:
        return Checkpoint(
            round=self.completed_rounds,
            schema_id=self.schema.schema_id,
            global_state=self.global_state,
            optimizer=self.optimizer.state_dict(),
            rng_state=rng_state_to_json(self.rng.getstate()),
            history=self.history,
            run_secret=self.run_secret,
        )

    # --- metrics ------------------------------------------------------------------------------------------------

    def write_metrics(self, complete: bool) -> Path:
        """metrics.json: per-round records and a summary; rewritten atomically after every round."""
        data = {
            "scenario": asdict(self.scenario),
            "privacy": self.privacy.mode,
            "schema_id": self.schema.schema_id,
            "complete": complete,
            "rounds": self.history,
            "summary": self.summary(),
        }
        path = self.run.out_dir / METRICS_FILE
        write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    def summary(self) -> dict[str, Any]:
        """Final accuracy, personalized accuracy and communication per client and round."""
        last = self.history[-1] if self.history else {}
        uploads = sum(r["uploads"] for r in self.history)
        sent = sum(r["clients"] for r in self.history)
        summary: dict[str, Any] = {
            "rounds": self.completed_rounds,
            "privacy_mode": self.privacy.mode,
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "accuracy_source": "clients" if self.scenario.personal_head else "central",
            "bytes_up_per_client_round": sum(r["bytes_up"] for r in self.history) / uploads if uploads else None,
            "bytes_down_per_client_round": sum(r["bytes_down"] for r in self.history) / sent if sent else None,
            "shared_params": self.schema.num_params("shared"),
            "full_model_bytes": full_model_bytes(self.model),
            "seconds": sum(r["seconds"] for r in self.history),
        }
        # Each device's accuracy on its own test split after its latest local training: the model it
        # would use (the global adapter fine-tuned on its data, with its own head when heads are personal).
        if self.dp is not None:
            summary |= self.dp.summary()
        if self.stopped is not None:
            summary["stopped"] = self.stopped
        personalized = _latest_client_accuracy(self.history)
        if personalized:
            summary["personalized_accuracy"] = sum(personalized.values()) / len(personalized)
            summary["personalized_clients"] = len(personalized)
        return summary


# --- helpers --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyPlan:
    """What the server needs to turn a plain round's replies into the next global state."""

    opener: ServerOpener
    validator: DeltaValidator
    optimizer: RoundStep
    server_round: int
    timeout: float  # the round timeout, named in the reason of a missing reply
    max_payload: int  # the largest legal payload (delta blob, sealed in sealed modes)
    min_clients: int = 1
    max_examples: int | None = None  # one client's largest FedAvg weight
    averager: Averager | None = None  # the accepted deltas' sum (default: example-weighted FedAvg; DP: clipped, noised)


def fold_plain_replies(
    arrivals: Iterable[tuple[int, Message | None]], global_state: State, plan: ReplyPlan
) -> tuple[State, dict[str, Any], list[dict[str, Any]]]:
    """Read, open, validate and fold each reply as it arrives, keeping none: the next global state (the same
    one when too few are accepted), the round record's fields and the clients' metrics.

    Every reply ends accepted or in ``rejected`` with a named reason; nothing a client sends raises here.
    """
    tally = _Replies()
    read = _unpack_replies(arrivals, plan.timeout, plan.max_payload, tally)
    deltas = _opened(read, plan.opener, plan.server_round, plan.validator.schema.schema_id, tally)
    fields: dict[str, Any]
    try:
        result = aggregate_round(
            global_state,
            deltas,
            plan.validator,
            plan.optimizer,
            plan.min_clients,
            max_examples=plan.max_examples,
            averager=plan.averager,
        )
        global_state, checked = result.state, result.rejected
        fields = {"accepted": result.accepted, "clipped": result.clipped}
    except EmptyAggregateError as err:
        logger.warning("round %d: %s; the global state stays as it was", plan.server_round, err)
        checked, fields = err.rejected, {"accepted": 0, "clipped": []}
    fields |= {"bytes_up": tally.bytes_up, "uploads": tally.uploads, "finished": tally.finished}
    fields["rejected"] = [{"client": c, "reason": r} for c, r in [*tally.rejected, *checked]]
    return global_state, fields, tally.client_metrics


class _Replies:
    """What reading a round's replies found beside the deltas: rejections, metrics and upload figures."""

    def __init__(self) -> None:
        self.rejected: list[tuple[str, str]] = []
        self.client_metrics: list[dict[str, Any]] = []
        self.bytes_up = 0
        self.uploads = 0
        self.finished = time.perf_counter()  # when the last reply came (or the deadline passed)


def _unpack_replies(
    arrivals: Iterable[tuple[int, Message | None]], timeout: float, max_bytes: int, tally: _Replies
) -> Iterator[tuple[int, DeltaReply]]:
    """Each arriving reply read within bounds; missing, late and malformed ones go to ``tally.rejected``."""
    for node, reply in arrivals:
        if reply is None:
            tally.rejected.append((f"node {node}", late_reason(timeout)))
            continue
        try:
            read = read_delta_reply(reply, node, max_bytes)
        except ReplyError as err:
            tally.rejected.append((f"node {node}", str(err)[:REASON_LIMIT]))
            continue
        except Exception as err:  # a client's bytes must never end the round
            logger.exception("unexpected error reading the reply of node %d", node)
            tally.rejected.append((f"node {node}", unexpected_reason(err)))
            continue
        tally.bytes_up += len(read.payload)
        tally.uploads += 1
        tally.client_metrics.append({"client": read.client, **read.metrics})
        yield node, read
    tally.finished = time.perf_counter()


def _opened(
    replies: Iterable[tuple[int, DeltaReply]], opener: ServerOpener, server_round: int, schema_id: str, tally: _Replies
) -> Iterator[ReceivedDelta]:
    """Each delta (and its sealed example count) out of its envelope in mode aead; rejected ones go to ``tally``."""
    for node, read in replies:
        try:
            blob, sealed_count = opener.open_delta(read.payload, server_round, node, schema_id)
        except EnvelopeError as err:
            logger.warning("leaving client %s out of the round: envelope rejected (%s)", read.client, err.reason)
            tally.rejected.append((read.client, envelope_reason(err)))
            continue
        except Exception as err:  # a client's bytes must never end the round
            logger.exception("unexpected error opening the reply of %s", read.client)
            tally.rejected.append((read.client, unexpected_reason(err)))
            continue
        count = read.num_examples if sealed_count is None else sealed_count
        yield ReceivedDelta(read.client, blob, cast(int, count))  # as the client sent it: aggregate_round checks it


def _weighted_accuracy(client_metrics: list[dict[str, Any]], limit: int) -> float | None:
    """Client accuracy weighted by test examples; under secagg+ devices keep that count, so each counts once.

    A claimed count weighs at most ``limit`` (max-examples-per-client), as in FedAvg: one device's
    report cannot drown the others'. An accuracy that is not a finite number in [0, 1] is left out, and
    a count that is not a finite number counts once: a client's metrics cannot break the round's score."""
    scored = []
    for metrics in client_metrics:
        accuracy = _finite(metrics.get("accuracy"))
        if accuracy is None or not 0.0 <= accuracy <= 1.0:
            continue
        count = _finite(metrics.get("test-examples", 1))
        scored.append((accuracy, min(max(1.0 if count is None else count, 0.0), float(limit))))
    total = sum(n for _, n in scored)
    return sum(a * n for a, n in scored) / total if total else None


def _finite(value: object) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return number if math.isfinite(number) else None


def _latest_client_accuracy(history: list[dict[str, Any]]) -> dict[str, float]:
    """Each client's accuracy on its own test split in the last round it took part in."""
    latest: dict[str, float] = {}
    for record in history:
        for metrics in record.get("client_results", []):
            accuracy = _finite(metrics.get("accuracy"))
            if accuracy is not None and "partition-id" in metrics:
                latest[str(metrics["partition-id"])] = accuracy
    return latest


def full_model_bytes(model: Any) -> int:
    """Bytes of every parameter of the model (backbone, adapter, head), each tensor counted once."""
    seen = {id(p): p.numel() * p.element_size() for p in model.module.parameters()}
    return sum(seen.values())


def wait_for_nodes(grid: Grid, needed: int, timeout: float, minimum: int | None = None) -> list[int]:
    """Connected node ids once ``needed`` are connected.

    After ``timeout`` seconds the round goes on with the nodes there are, if at least ``minimum``
    (default: ``needed``); TimeoutError otherwise.
    """
    minimum = needed if minimum is None else minimum
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            if len(nodes) >= minimum:
                logger.warning(
                    "%d of %d clients connected after %g s: the round goes on with them", len(nodes), needed, timeout
                )
                return nodes
            raise TimeoutError(
                f"only {len(nodes)} of the {needed} clients a round needs joined within {timeout:g} s "
                f"(at least {minimum} are needed to go on)"
            )
        logger.info("waiting for clients: %d connected, %d needed", len(nodes), needed)
        time.sleep(1.0)
    return nodes


class BudgetSpent(Exception):
    """One more round would spend more privacy than ``max-epsilon`` allows: the run stops before it."""


def _round_line(record: dict[str, Any]) -> str:
    accuracy = record.get("accuracy")
    shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
    epsilon = f", ε = {record['epsilon']:.3f}" if "epsilon" in record else ""
    return (
        f"accuracy {shown}{epsilon}, {record['accepted']}/{record['clients']} clients accepted, "
        f"{record['bytes_up']:,} B up, {record['bytes_down']:,} B down, {record['seconds']:.1f} s"
    )

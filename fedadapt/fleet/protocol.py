"""Names of the keys that travel on the wire between clients and the server.

Every app reads and writes message content through these constants, never through
string literals, so a renamed key is one edit and a typo is an import error.
"""

from __future__ import annotations

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord of a (possibly encrypted) serialized adapter state or delta
METRICS = "metrics"  # MetricRecord of client results
CONFIG = "config"  # ConfigRecord of instructions for the round

# Keys inside records
ADAPTER_STATE = "adapter-state"  # bytes of fedadapt.delta.serialize for the full shared state
ADAPTER_DELTA = "adapter-delta"  # bytes of fedadapt.delta.serialize for a shared-part delta
SCHEMA_ID = "schema-id"  # the adapter schema id the bytes were made for
COMPRESSION = "compression"  # none | fp16 | int8
NUM_EXAMPLES = "num-examples"  # FedAvg weight; the key Flower's strategies weight by
SERVER_ROUND = "server-round"
SECAGG_STAGE = "secagg-stage"  # which SecAgg+ stage a TRAIN message runs (absent: a plain round)
SECAGG_PAYLOAD = "secagg-payload"  # bytes of a fedadapt.privacy.secagg.wire payload, sealed when sent by a client
SECAGG_SESSION = "secagg-session"  # context.state key of a client's SecAgg+ session (its round's secrets)
DP_CLIP = "dp-clip"  # [privacy.dp] under secagg+: the round's L2 clip norm (float) a device clips its delta to

"""IVS Real-Time call-rate quotas per operation (ivs-facts §3): what the emulator enforces and we respect."""

from __future__ import annotations

_STAGE_TPS = 5.0
_PUBLIC_KEY_TPS = 3.0
_TAG_TPS = 10.0
_COMPOSITION_TPS = 5.0

# Calls per second per account and region; none is adjustable in AWS.
OPERATION_RATES: dict[str, float] = {
    "CreateParticipantToken": 50.0,
    **dict.fromkeys(
        (
            "CreateStage",
            "GetStage",
            "ListStages",
            "UpdateStage",
            "DeleteStage",
            "GetStageSession",
            "ListStageSessions",
            "ListParticipants",
            "GetParticipant",
            "ListParticipantEvents",
            "DisconnectParticipant",
        ),
        _STAGE_TPS,
    ),
    **dict.fromkeys(
        ("ImportPublicKey", "GetPublicKey", "ListPublicKeys", "DeletePublicKey"), _PUBLIC_KEY_TPS
    ),
    **dict.fromkeys(("TagResource", "UntagResource", "ListTagsForResource"), _TAG_TPS),
    # The quota page lists no rate for replication; assumed to be the Stage operations' 5 TPS, so a
    # repair storm stays within what every other Stage call gets.
    **dict.fromkeys(
        ("StartParticipantReplication", "StopParticipantReplication", "ListParticipantReplicas"), _STAGE_TPS
    ),
    # "Composition, Encoder/Ingest/Storage configuration operations: 5 TPS each" on the quota page.
    **dict.fromkeys(
        (
            "CreateEncoderConfiguration",
            "GetEncoderConfiguration",
            "ListEncoderConfigurations",
            "DeleteEncoderConfiguration",
            "StartComposition",
            "GetComposition",
            "ListCompositions",
            "StopComposition",
        ),
        _COMPOSITION_TPS,
    ),
}

# The `ivs` (low-latency channels) operations the overflow tier calls. ivs-facts lists no rates for
# them; assumed to be 5 TPS, the rate IVS gives most management operations.
CHANNEL_OPERATION_RATES: dict[str, float] = dict.fromkeys(
    ("CreateChannel", "GetChannel", "ListChannels", "DeleteChannel"), 5.0
)

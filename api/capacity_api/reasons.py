"""Condition types and CamelCase reasons, in one place for the operator, agents and printers."""

from __future__ import annotations

from typing import Final

# Claim condition types
ADMITTED: Final = "Admitted"
RECOVERED: Final = "Recovered"
FALSIFIED: Final = "Falsified"

# Node condition types
READY: Final = "Ready"
MEMORY_PRESSURE: Final = "MemoryPressure"
CPU_PRESSURE: Final = "CPUPressure"
IO_PRESSURE: Final = "IOPressure"
STALE: Final = "Stale"
FENCED: Final = "Fenced"
"""Written by the operator: True while the node is not used (failed, or back and not trusted
again yet), False once it is trusted again."""
PRESSURE_CONDITIONS: Final = (MEMORY_PRESSURE, CPU_PRESSURE, IO_PRESSURE)

# Node reasons (written by the agent)
MEASURING: Final = "Measuring"
SUBSTRATES_STALE: Final = "SubstratesStale"
NO_SUBSTRATES: Final = "NoSubstrates"
FRESH: Final = "Fresh"
PSI_ABOVE_THRESHOLD: Final = "PSIAboveThreshold"
PSI_BELOW_THRESHOLD: Final = "PSIBelowThreshold"
PSI_UNAVAILABLE: Final = "PSIUnavailable"
CPU_THROTTLED: Final = "CPUThrottled"

# Claim reasons
PROPOSED: Final = "Proposed"
QUORUM_REACHED: Final = "QuorumReached"
VOTE_REFUSED: Final = "VoteRefused"
DEADLINE_PASSED: Final = "DeadlinePassed"
ATTEMPTS_EXHAUSTED: Final = "AttemptsExhausted"
WAITING_FOR_NODES: Final = "WaitingForNodes"
WAITING_FOR_CAPACITY: Final = "WaitingForCapacity"
INSUFFICIENT_CAPACITY: Final = "InsufficientCapacity"
EXCEEDS_NODE_CAPACITY: Final = "ExceedsNodeCapacity"
NO_NODE_OFFERS_SUBSTRATE: Final = "NoNodeOffersSubstrate"
CAPACITY_TAKEN: Final = "CapacityTaken"
SPEC_CHANGED: Final = "SpecChanged"
RELEASED: Final = "Released"

# Failure detection and recovery (node reasons written by the operator, claim reasons)
LEASE_EXPIRED: Final = "LeaseExpired"
NODE_FAILED: Final = "NodeFailed"
PARTITION_SUSPECTED: Final = "PartitionSuspected"
NODE_RETURNED: Final = "NodeReturned"
WITNESSED_ALIVE: Final = "WitnessedAlive"
NODE_FENCED: Final = "NodeFenced"
RETURNING: Final = "Returning"
RECOVERING: Final = "Recovering"
RECOVERED_REASON: Final = "Recovered"
MAX_RECOVERIES: Final = "MaxRecoveriesReached"
RECOVERY_RATE_LIMITED: Final = "RecoveryRateLimited"
RECOVERY_GAVE_UP: Final = "RecoveryGaveUp"

# Calibration (Events on the capacity-calibration ConfigMap)
INVALID_THRESHOLD: Final = "InvalidThreshold"
INVALID_CALIBRATION: Final = "InvalidCalibration"
"""A key of the calibration ConfigMap other than a threshold (pins, history) could not be read."""
THRESHOLD_MOVED: Final = "ThresholdMoved"
"""Calibration moved a threshold (the message says from, to and why)."""
THRESHOLD_CHANGED: Final = "ThresholdChanged"
"""A threshold was changed by hand or rolled back (recorded in the history)."""
